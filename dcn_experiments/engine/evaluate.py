"""Evaluation loop: loss and metrics of a model over (a limited number of) batches of a loader.

:func:`evaluate_many` runs several input transforms in one pass over the loader (each batch is
read once), keeping one loss sum and one metric per transform; with no transform it computes the
same numbers as the trainer's validation (same batches, same order, same arithmetic).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dcn_experiments.engine.distributed import all_reduce_
from dcn_experiments.errors import ConfigError
from dcn_experiments.tasks import Task


def batch_limit(limit: int | float | None, available: int, key: str) -> int:
    """Number of batches to run: all (``None``), an integer count, or a fraction in (0, 1]."""
    if limit is None:
        return available
    if isinstance(limit, bool) or limit <= 0:
        raise ConfigError(f"{key}={limit} must be a positive batch count or a fraction in (0, 1]")
    if isinstance(limit, float) and limit <= 1.0:
        return max(1, int(available * limit))
    if isinstance(limit, float) and not limit.is_integer():
        raise ConfigError(f"{key}={limit}: use an integer batch count or a fraction in (0, 1]")
    return min(available, int(limit))


BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Progress = Callable[[Iterable, int], Iterable]


@torch.no_grad()
def evaluate_many(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    device: torch.device,
    limit_batches: int | float | None,
    transforms: Mapping[str, BatchTransform | None],
    *,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    distributed: bool = False,
    limit_key: str = "trainer.limit_val_batches",
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Per name in ``transforms``: ``{"loss", <task.metric_key>, "images", "time_s", "data_time_s", "details"}``.

    Each transform maps a batch ``(inputs, targets)`` on ``device`` to the batch the model sees
    (None: unchanged). ``time_s`` is the time of that transform and its forward passes,
    ``data_time_s`` the time spent waiting for batches (shared by all transforms), ``details`` the
    task's ``final_details``. ``limit_batches`` follows ``batch_limit`` (all, a count or a fraction);
    ``amp_dtype`` runs the forward pass under autocast, ``memory_format`` lays the inputs out;
    ``progress`` wraps the batch iterator. ``distributed``: ``loader`` holds this DDP rank's shard
    and every rank calls this; losses, image counts and metrics are summed over the ranks.
    """
    model.eval()
    count = batch_limit(limit_batches, len(loader), limit_key)
    metrics = {name: task.make_metric() for name in transforms}
    loss_sums = {name: torch.zeros((), device=device) for name in transforms}
    images = dict.fromkeys(transforms, 0)
    seconds = dict.fromkeys(transforms, 0.0)
    loading = 0.0
    batches: Iterable = itertools.islice(loader, count)
    tick = time.perf_counter()
    for inputs, targets in progress(batches, count) if progress else batches:
        inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        loading += time.perf_counter() - tick
        for name, transform in transforms.items():
            start = time.perf_counter()
            x, y = (inputs, targets) if transform is None else transform(inputs, targets)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(x)
            loss_sums[name] += task.loss(logits.float(), y) * x.shape[0]
            images[name] += x.shape[0]
            metrics[name].update(logits, y)
            seconds[name] += time.perf_counter() - start
        tick = time.perf_counter()
    results = {}
    for name, metric in metrics.items():
        if distributed:
            metric.reduce()
            count = torch.tensor(float(images[name]), dtype=torch.float64)
            totals = torch.stack([loss_sums[name].double().cpu(), count])
            all_reduce_(totals)
            loss_sums[name], images[name] = totals[0], int(totals[1].item())
        results[name] = {
            "loss": (loss_sums[name] / max(images[name], 1)).item(),
            task.metric_key: metric.compute()[task.metric_key],
            "images": images[name],
            "time_s": seconds[name],
            "data_time_s": loading,
            "details": task.final_details(metric),
        }
    return results


def evaluate(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    device: torch.device,
    limit_batches: int | float | None,
    transform: BatchTransform | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    distributed: bool = False,
    limit_key: str = "trainer.limit_val_batches",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Loss, headline metric (``task.metric_key``), image count, wall seconds and the task's final details.

    ``time_s`` covers the whole pass (batch loading included), as the trainer's ``val_time_s``.
    """
    result = evaluate_many(
        model,
        task,
        loader,
        device,
        limit_batches,
        {"": transform},
        amp_dtype=amp_dtype,
        memory_format=memory_format,
        distributed=distributed,
        limit_key=limit_key,
        progress=progress,
    )[""]
    return {**result, "time_s": result["time_s"] + result.pop("data_time_s")}
