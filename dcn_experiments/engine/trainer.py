"""The training loop: epochs of train + validation, logging, checkpoints, metrics history."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcn_experiments.engine.checkpoint import save_checkpoint
from dcn_experiments.engine.tensorboard import TensorBoardLogger
from dcn_experiments.errors import ConfigError
from dcn_experiments.models import deformable_layers
from dcn_experiments.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """What the loop needs from ``cfg.trainer`` (see conf/trainer/default.yaml)."""

    epochs: int
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    amp: bool = False
    amp_dtype: str = "bfloat16"
    grad_clip: float | None = None
    progress: bool = True


@dataclass
class FitResult:
    """Per-epoch history plus the final validation details of the last epoch."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    final_details: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False


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


def _take(loader: Iterable, count: int) -> Iterator:
    for index, batch in enumerate(loader):
        if index >= count:
            break
        yield batch


class Trainer:
    """Runs the epochs for one model/task/data combination and records what a user compares."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        settings: TrainerSettings,
        logger: TensorBoardLogger,
        checkpoint_path: Path,
        checkpoint_extra: dict[str, Any],
        epoch_end: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.task, self.optimizer, self.schedule = model, task, optimizer, schedule
        self.epoch_end = epoch_end  # called with the epoch number after each epoch's logging
        self.device, self.settings, self.logger = device, settings, logger
        self.checkpoint_path, self.checkpoint_extra = checkpoint_path, checkpoint_extra
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(settings.amp_dtype)
        if dtype is None:
            raise ConfigError(f"trainer.amp_dtype={settings.amp_dtype!r} is not valid; use bfloat16 or float16")
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and dtype == torch.float16)
        self.global_step = 0

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.settings.amp)

    def _progress(self, iterable: Iterable, total: int, desc: str) -> tqdm:
        # disable=None: quiet when stderr is not a terminal (CI, log files)
        return tqdm(
            iterable,
            total=total,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            disable=None if self.settings.progress else True,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        """One pass over (a limited number of) training batches."""
        self.model.train()
        metric = self.task.make_metric()
        count = batch_limit(self.settings.limit_train_batches, len(loader), "trainer.limit_train_batches")
        loss_sum = torch.zeros((), device=self.device)
        images = 0
        data_time = step_time = 0.0
        bar = self._progress(_take(loader, count), count, f"train {epoch}")
        start = tick = time.perf_counter()
        for inputs, targets in bar:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loaded = time.perf_counter()
            with self._autocast():
                logits = self.model(inputs)
                loss = self.task.loss(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.settings.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            self.global_step += 1
            loss_sum += loss.detach() * inputs.shape[0]
            images += inputs.shape[0]
            metric.update(logits.detach(), targets)
            now = time.perf_counter()
            data_time += loaded - tick
            step_time += now - loaded
            tick = now
            if bar.n % 10 == 0 and not bar.disable:
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    data_ms=f"{1e3 * data_time / (bar.n + 1):.0f}",
                    step_ms=f"{1e3 * step_time / (bar.n + 1):.0f}",
                )
        self._sync()
        elapsed = time.perf_counter() - start
        bar.close()
        metric.reduce()
        return {
            "train_loss": (loss_sum / max(images, 1)).item(),
            f"train_{self.task.metric_key}": metric.compute()[self.task.metric_key],
            "epoch_time_s": elapsed,
            "train_throughput_img_s": images / elapsed if elapsed > 0 else 0.0,
            "data_time_s": data_time,
        }

    @torch.no_grad()
    def validate(self, loader: DataLoader, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Loss and metric over (a limited number of) validation batches."""
        self.model.eval()
        metric = self.task.make_metric()
        count = batch_limit(self.settings.limit_val_batches, len(loader), "trainer.limit_val_batches")
        loss_sum = torch.zeros((), device=self.device)
        images = 0
        start = time.perf_counter()
        for inputs, targets in self._progress(_take(loader, count), count, f"val {epoch}"):
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(inputs)
            loss_sum += self.task.loss(logits.float(), targets) * inputs.shape[0]
            images += inputs.shape[0]
            metric.update(logits, targets)
        metric.reduce()
        summary = {
            "val_loss": (loss_sum / max(images, 1)).item(),
            f"val_{self.task.metric_key}": metric.compute()[self.task.metric_key],
            "val_time_s": time.perf_counter() - start,
        }
        return summary, self.task.final_details(metric)

    def offset_statistics(self) -> dict[str, tuple[float, float]]:
        """Mean and max |offset| per deformable layer over the last training epoch."""
        stats = {}
        for name, layer in deformable_layers(self.model):
            popped = layer.pop_offset_stats()
            if popped is not None:
                stats[name] = popped
        return stats

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> FitResult:
        """Train for ``settings.epochs`` epochs, validating and checkpointing after each."""
        result = FitResult()
        key = self.task.metric_key
        best = -math.inf
        for epoch in range(1, self.settings.epochs + 1):
            train = self.train_epoch(train_loader, epoch)
            val, details = self.validate(val_loader, epoch)
            offsets = self.offset_statistics()
            record = {"epoch": epoch, **train, **val, "lr": self.optimizer.param_groups[0]["lr"]}
            if offsets:
                record["offset_abs_mean"] = statistics.fmean(mean for mean, _ in offsets.values())
                record["offset_abs_max"] = max(peak for _, peak in offsets.values())
            result.epochs.append(record)
            result.final_details = details
            self._log_epoch(record, offsets)
            if self.epoch_end is not None:
                self.epoch_end(epoch)
            best = max(best, record[f"val_{key}"])
            self._save(epoch, best)
            log.info(
                "epoch %d/%d  train_loss %.4f  train_%s %.4f  val_loss %.4f  val_%s %.4f  %.1fs  %.0f img/s",
                epoch,
                self.settings.epochs,
                record["train_loss"],
                key,
                record[f"train_{key}"],
                record["val_loss"],
                key,
                record[f"val_{key}"],
                record["epoch_time_s"],
                record["train_throughput_img_s"],
            )
            if not math.isfinite(record["train_loss"]):
                log.error(
                    "training diverged (non-finite loss) in epoch %d; stopping this run. Lower trainer.lr.", epoch
                )
                result.diverged = True
                break
        return result

    def _log_epoch(self, record: dict[str, Any], offsets: dict[str, tuple[float, float]]) -> None:
        key, epoch = self.task.metric_key, record["epoch"]
        self.logger.scalars(
            {
                "train/loss": record["train_loss"],
                f"train/{key}": record[f"train_{key}"],
                "val/loss": record["val_loss"],
                f"val/{key}": record[f"val_{key}"],
                "lr": record["lr"],
                "time/epoch_s": record["epoch_time_s"],
                "time/throughput_img_s": record["train_throughput_img_s"],
            },
            epoch,
        )
        for name, (mean, peak) in offsets.items():
            self.logger.scalars({f"offsets/{name}/abs_mean": mean, f"offsets/{name}/abs_max": peak}, epoch)

    def _save(self, epoch: int, best: float) -> None:
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "epoch": epoch,
            "step": self.global_step,
            "best_metric": best,
            **self.checkpoint_extra,
        }
        save_checkpoint(self.checkpoint_path, payload)
