"""Wiring of a run's scale-out settings: DDP rank and device, the thread budget of parallel sweep
jobs, precision/layout/compilation of the model, and what the run record says about them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dcn_experiments.engine.distributed import DistContext, device_for_rank, init_distributed, wrap_model
from dcn_experiments.engine.precision import (
    Precision,
    deformable_precision_note,
    maybe_compile,
    memory_format,
    resolve_precision,
)
from dcn_experiments.engine.tensorboard import NullLogger, TensorBoardLogger

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply_thread_budget(concurrent_jobs: int) -> int:
    """With ``concurrent_jobs`` > 1 jobs on this machine, give each ``cores // jobs`` torch threads
    (so parallel sweep jobs do not oversubscribe the cores); return the threads now in use."""
    if concurrent_jobs > 1:
        torch.set_num_threads(max(1, available_cores() // concurrent_jobs))
    return torch.get_num_threads()


def placement(device_name: str) -> tuple[DistContext, torch.device]:
    """This process's DDP context (joining the process group under torchrun/SLURM) and device."""
    from dcn_experiments.engine.device import resolve_device

    context = init_distributed()
    return context, device_for_rank(resolve_device(device_name), context)


def prepare_model(
    model: nn.Module, trainer_cfg: DictConfig, device: torch.device, context: DistContext
) -> tuple[nn.Module, nn.Module]:
    """Lay ``model`` out (channels-last), wrap it for DDP (with synchronised BatchNorm) and compile
    it as configured; return the module the training step calls and the one evaluation calls.

    Call before building the optimizer: synchronised BatchNorm replaces parameters on CPU.
    """
    model.to(memory_format=memory_format(trainer_cfg.channels_last))
    train_net = wrap_model(model, device, context, trainer_cfg.sync_batchnorm)
    compiled = maybe_compile(train_net, trainer_cfg.compile)
    # DDP's forward talks to the other ranks; evaluation (sharded, maybe uneven) must not.
    eval_net = compiled if train_net is model else maybe_compile(model, trainer_cfg.compile)
    return compiled, eval_net


def make_logger(run_dir: Path, purge_step: int | None, context: DistContext) -> TensorBoardLogger:
    """TensorBoard under ``run_dir/tb`` on rank 0, a logger that writes nothing on the others."""
    return TensorBoardLogger(run_dir / "tb", purge_step=purge_step) if context.is_main else NullLogger()


def precision_of(trainer_cfg: DictConfig, device: torch.device) -> Precision:
    """The run's precision (a one-line error for an invalid value, before anything is written)."""
    return resolve_precision(trainer_cfg.precision, device)


def scale_record(
    trainer_cfg: DictConfig,
    precision: Precision,
    context: DistContext,
    deformable_usage: dict[str, int],
    batch_size: int,
) -> dict[str, Any]:
    """The run record's scale-out facts: precision, the deformable layers' compute dtype(s), layout,
    compilation, DDP world; a precision mismatch of the deformable layers is logged."""
    note = deformable_precision_note(precision, deformable_usage)
    if note:
        log.warning(note)
    return {
        "precision": precision.name,
        "deformable_precision": "+".join(sorted(deformable_usage)) or "none",
        "deformable_precision_note": note,
        "channels_last": bool(trainer_cfg.channels_last),
        "compile": bool(trainer_cfg.compile),
        "world_size": context.world_size,
        "global_batch_size": batch_size * context.world_size,  # dataset.batch_size is per process
    }
