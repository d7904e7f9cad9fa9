"""Training engine: device, optimizer, loop, checkpoints, TensorBoard, metrics.json."""

from dcn_experiments.engine.checkpoint import load_checkpoint, save_checkpoint
from dcn_experiments.engine.device import resolve_device
from dcn_experiments.engine.optim import build_optimizer, build_schedule
from dcn_experiments.engine.results import RUN_METRICS_FILE, summarize_run, write_json_atomic
from dcn_experiments.engine.tensorboard import TensorBoardLogger
from dcn_experiments.engine.trainer import Trainer, TrainerSettings, batch_limit

__all__ = [
    "RUN_METRICS_FILE",
    "TensorBoardLogger",
    "Trainer",
    "TrainerSettings",
    "batch_limit",
    "build_optimizer",
    "build_schedule",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "summarize_run",
    "write_json_atomic",
]
