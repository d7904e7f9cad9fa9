"""Optimizers and learning-rate schedules, with a separate rate for deformable offset predictors."""

from __future__ import annotations

import math

import torch
from torch import nn

from dcn_experiments.errors import ConfigError
from dcn_experiments.models import offset_parameters

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine")


def parameter_groups(model: nn.Module, lr: float, offset_lr_mult: float) -> list[dict]:
    """Two groups: the offset/mask predictors at ``lr * offset_lr_mult``, everything else at ``lr``."""
    offsets = offset_parameters(model)
    offset_ids = {id(p) for p in offsets}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in offset_ids]
    groups = [{"params": main, "lr": lr, "name": "main"}]
    if offsets:
        groups.append({"params": offsets, "lr": lr * offset_lr_mult, "name": "offsets"})
    return groups


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float, offset_lr_mult: float
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum) over :func:`parameter_groups`."""
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"trainer.lr={lr} must be a positive number")
    groups = parameter_groups(model, lr, offset_lr_mult)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise ConfigError(f"trainer.optimizer={name!r} is not valid; choose one of {', '.join(OPTIMIZERS)}")


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: constant (``none``) or linear warmup + cosine decay to 0 (``cosine``)."""
    if name not in SCHEDULES:
        raise ConfigError(f"trainer.schedule={name!r} is not valid; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"trainer.warmup_steps={warmup_steps} must be >= 0")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "none":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
