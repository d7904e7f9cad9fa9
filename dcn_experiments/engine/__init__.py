"""Training engine: device, optimizer, loop, checkpoints, TensorBoard, the run record."""

from dcn_experiments.engine.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dcn_experiments.engine.device import resolve_device
from dcn_experiments.engine.evaluate import batch_limit
from dcn_experiments.engine.isolation import describe_exit, run_in_child_process, run_isolated_job
from dcn_experiments.engine.optim import build_optimizer, build_schedule
from dcn_experiments.engine.results import (
    RUN_RECORD_FILE,
    failed_record,
    headline_value,
    read_run_record,
    record_failure,
    summarize_run,
    write_json_atomic,
    write_run_record,
)
from dcn_experiments.engine.tensorboard import TensorBoardLogger
from dcn_experiments.engine.trainer import Trainer, TrainerSettings

__all__ = [
    "RUN_RECORD_FILE",
    "TensorBoardLogger",
    "Trainer",
    "TrainerSettings",
    "batch_limit",
    "build_optimizer",
    "build_schedule",
    "describe_exit",
    "failed_record",
    "headline_value",
    "load_checkpoint",
    "read_checkpoint",
    "read_run_record",
    "record_failure",
    "resolve_device",
    "run_in_child_process",
    "run_isolated_job",
    "save_checkpoint",
    "summarize_run",
    "write_json_atomic",
    "write_run_record",
]
