"""The training loop: epochs of train + validation, logging, checkpoints, exact resume.

A checkpoint holds everything the loop needs to continue as if it had never stopped: weights,
optimizer, schedule and GradScaler state, the position (epochs done, batches done in the current
epoch), every RNG state (Python, NumPy, torch CPU and CUDA), the data order of the current epoch,
the partial sums of the epoch's loss and metric, the history and the best metric. On CPU, a run
stopped anywhere and resumed ends with bitwise the same weights and metrics as one that was not
(with ``dataset.num_workers=0``; with workers, the data order is exact but the workers'
augmentation randomness of the resumed epoch is not).

Under DDP (``dist_context.enabled``) the step runs through ``train_net`` (DistributedDataParallel);
the ranks agree every step on stopping (a signal) and on skipping a non-finite loss, sums and
metrics are reduced over the ranks at the end of each epoch, and only rank 0 writes checkpoints
(a mid-epoch one holds every rank's partial sums, so it resumes with the same number of ranks).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcn_experiments.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from dcn_experiments.engine.distributed import DistContext, all_reduce_, gather_objects
from dcn_experiments.engine.evaluate import batch_limit, evaluate
from dcn_experiments.engine.precision import memory_format, resolve_precision
from dcn_experiments.engine.tensorboard import TensorBoardLogger
from dcn_experiments.errors import ConfigError
from dcn_experiments.models import deformable_layers
from dcn_experiments.tasks import Task

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 2


@dataclass
class TrainerSettings:
    """What the loop needs from ``cfg.trainer`` (see conf/trainer/default.yaml)."""

    epochs: int
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    precision: str = "32"
    channels_last: bool = False
    grad_clip: float | None = None
    progress: bool = True
    checkpoint_every_n_steps: int | None = None
    skip_nonfinite: bool = False


@dataclass
class FitResult:
    """Per-epoch history plus the final validation details of the last epoch."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    final_details: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
    divergence: str | None = None
    skipped_nonfinite: int = 0


class TrainingStoppedError(Exception):
    """SIGTERM/SIGINT arrived; the loop finished its step and wrote a checkpoint to resume from."""

    def __init__(self, signal_name: str, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal_name} in epoch {epoch} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.checkpoint, self.epoch, self.step = signal_name, checkpoint, epoch, step

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by that signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + signal.Signals[self.signal_name].value


class _DivergedError(Exception):
    """A non-finite loss stopped the epoch (the message says where)."""


def _take(loader: Iterable, count: int) -> Iterator:
    for index, batch in enumerate(loader):
        if index >= count:
            break
        yield batch


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain data."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _StopSignals:
    """While active, SIGTERM and SIGINT only set a flag: the loop stops after the current step."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then writing a checkpoint", self.received)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs the epochs for one model/task/data combination and records what a user compares.

    ``checkpoint_dir`` receives ``last.pt`` (every epoch end, every
    ``settings.checkpoint_every_n_steps`` steps, and when stopped by SIGTERM/SIGINT) and ``best.pt``
    (when the validation metric improves). ``resume_from`` (a checkpoint payload) continues a run.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        settings: TrainerSettings,
        logger: TensorBoardLogger,
        checkpoint_dir: Path,
        checkpoint_extra: dict[str, Any],
        epoch_end: Callable[[int], None] | None = None,
        *,
        train_net: nn.Module | None = None,
        eval_net: nn.Module | None = None,
        dist_context: DistContext | None = None,
    ) -> None:
        self.model, self.task, self.optimizer, self.schedule = model, task, optimizer, schedule
        # train_net/eval_net: the model as the steps call it (DDP-wrapped, compiled); self.model's
        # state is what checkpoints hold.
        self.train_net = model if train_net is None else train_net
        self.eval_net = model if eval_net is None else eval_net
        self.context = dist_context or DistContext()
        self.device, self.settings, self.logger = device, settings, logger
        self.checkpoint_dir, self.checkpoint_extra = checkpoint_dir, checkpoint_extra
        self.epoch_end = epoch_end  # called with the epoch number after each epoch's logging
        self.precision = resolve_precision(settings.precision, device)
        self.memory_format = memory_format(settings.channels_last)
        every = settings.checkpoint_every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"trainer.checkpoint_every_n_steps={every} must be a positive integer or null")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.uses_scaler)
        self.global_step = 0
        self.epochs_done = 0
        self.best = -math.inf
        self.result = FitResult()
        self._resume_epoch: dict[str, Any] | None = None  # the partial epoch a checkpoint left
        # The training loader's generator state for the next epoch (the data order it will draw):
        # an epoch-end checkpoint carries it, or a resumed run would reshuffle from the seed.
        self._next_data_order: torch.Tensor | None = None
        self._signals = _StopSignals()

    @property
    def last_checkpoint(self) -> Path:
        """Where ``last.pt`` is written."""
        return self.checkpoint_dir / "last.pt"

    def _autocast(self) -> torch.autocast:
        return self.precision.autocast(self.device)

    def _agree(self, finite: bool = True) -> tuple[bool, str | None]:
        """(every rank's loss finite, the stop signal if any rank got one): under DDP all ranks
        must skip or stop at the same step, or the others wait forever in the next collective."""
        received = self._signals.received  # a snapshot: a signal may land while the step runs
        if not self.context.enabled:
            return finite, received
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if received else 0.0])
        all_reduce_(flags, "max")
        if flags[1] > 0 and received is None:
            received = "SIGTERM"  # another rank was signalled (torchrun forwards signals to all)
        return bool(flags[0] == 0), received

    def _progress(self, iterable: Iterable, total: int, desc: str, initial: int = 0) -> tqdm:
        # disable=None: quiet when stderr is not a terminal (CI, log files)
        return tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            disable=None if self.settings.progress else True,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ state

    def state_dict(self, epoch_progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint payload (tensors and plain data only: loads with ``weights_only=True``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epochs_done,
            "step": self.global_step,
            "step_in_epoch": epoch_progress["step_in_epoch"] if epoch_progress else 0,
            "epoch_progress": epoch_progress,
            "next_data_order": self._next_data_order,
            "best_metric": self.best,
            "history": self.result.epochs,
            "skipped_nonfinite": self.result.skipped_nonfinite,
            "rng": rng_states(),
            **self.checkpoint_extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict` (RNG states restored last)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epochs_done, self.global_step = int(state["epoch"]), int(state["step"])
        self.best = float(state["best_metric"])
        self.result.epochs = list(state.get("history") or [])
        self.result.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self._resume_epoch = state.get("epoch_progress")
        self._next_data_order = state.get("next_data_order")
        restore_rng_states(state["rng"])

    def _save(self, epoch_progress: dict[str, Any] | None = None) -> None:
        if not self.context.is_main:
            return
        self.logger.flush()  # what was logged before the checkpoint survives a SIGKILL after it
        save_checkpoint(self.last_checkpoint, self.state_dict(epoch_progress))

    # ------------------------------------------------------------------ loop

    def train_epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        """One pass over (a limited number of) training batches, resumable mid-epoch."""
        self.model.train()
        metric = self.task.make_metric()
        count = batch_limit(self.settings.limit_train_batches, len(loader), "trainer.limit_train_batches")
        resume, self._resume_epoch = self._resume_epoch, None
        done, loss_sum, images, elapsed_before = 0, torch.zeros((), device=self.device, dtype=torch.float64), 0, 0.0
        generator: torch.Generator | None = getattr(loader, "generator", None)
        sampler = loader.sampler
        if resume is not None:
            done, elapsed_before = resume["step_in_epoch"], resume["elapsed_s"]
            own = self._rank_progress(resume)
            images = own["images"]
            loss_sum += own["loss_sum"].to(self.device)
            metric.load_state_dict(own["metric"])
            for name, layer in deformable_layers(self.model):
                layer.load_offset_stats(own["offset_stats"].get(name))
            if generator is not None:
                generator.set_state(resume["data_order"])
        elif generator is not None and self._next_data_order is not None:
            generator.set_state(self._next_data_order)  # resumed at an epoch end
        # The data order of this epoch is drawn from the loader's generator when iteration starts:
        # its state now, plus the batches done, is all a resume needs to see the same batches.
        data_order = generator.get_state() if generator is not None else None
        if hasattr(sampler, "skip"):
            sampler.skip = done * (loader.batch_size or 1)
        data_time = step_time = 0.0
        bar = self._progress(_take(loader, count - done), count, f"train {epoch}", initial=done)
        start = tick = time.perf_counter()
        step_in_epoch = done
        try:
            for inputs, targets in bar:
                inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
                targets = targets.to(self.device, non_blocking=True)
                loaded = time.perf_counter()
                with self._autocast():
                    logits = self.train_net(inputs)
                    loss = self.task.loss(logits.float(), targets)
                self.optimizer.zero_grad(set_to_none=True)
                step_in_epoch += 1
                finite, stop = self._agree(bool(torch.isfinite(loss)))
                if not finite:
                    if not self.settings.skip_nonfinite:
                        raise _DivergedError(
                            f"non-finite loss ({loss.item()}) in epoch {epoch} at step {step_in_epoch} "
                            f"(global step {self.global_step + 1}); lower trainer.lr, set trainer.grad_clip, "
                            "or trainer.skip_nonfinite=true to skip such batches"
                        )
                    self.result.skipped_nonfinite += 1
                    log.warning("skipped a batch with a non-finite loss (epoch %d, step %d)", epoch, step_in_epoch)
                else:
                    self.scaler.scale(loss).backward()
                    if self.settings.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    loss_sum += loss.detach().double() * inputs.shape[0]
                    images += inputs.shape[0]
                    metric.update(logits.detach(), targets)
                self.schedule.step()
                self.global_step += 1
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
                every = self.settings.checkpoint_every_n_steps
                at_step_checkpoint = every and self.global_step % every == 0 and step_in_epoch < count
                if at_step_checkpoint or (stop and step_in_epoch < count):
                    own = {
                        "images": images,
                        "loss_sum": loss_sum.detach().cpu(),
                        "metric": metric.state_dict(),
                        "offset_stats": {n: layer.offset_stats_state() for n, layer in deformable_layers(self.model)},
                    }
                    progress = {
                        "step_in_epoch": step_in_epoch,
                        **own,
                        "elapsed_s": elapsed_before + time.perf_counter() - start,
                        "data_order": data_order,
                    }
                    if self.context.enabled:
                        progress["ranks"] = gather_objects(own, self.context)
                    self._save(progress)
                    if stop:
                        raise TrainingStoppedError(stop, self.last_checkpoint, epoch, step_in_epoch)
        finally:
            bar.close()
            if hasattr(sampler, "skip"):
                sampler.skip = 0
        self._sync()
        elapsed = elapsed_before + time.perf_counter() - start
        self._next_data_order = generator.get_state() if generator is not None else None
        metric.reduce()
        if self.context.enabled:
            totals = torch.stack([loss_sum.cpu(), torch.tensor(float(images), dtype=torch.float64)])
            all_reduce_(totals)
            loss_sum, images = totals[0], int(totals[1].item())
        return {
            "train_loss": (loss_sum / max(images, 1)).item(),
            f"train_{self.task.metric_key}": metric.compute()[self.task.metric_key],
            "epoch_time_s": elapsed,
            "train_throughput_img_s": images / elapsed if elapsed > 0 else 0.0,
            "data_time_s": data_time,
        }

    def validate(self, loader: DataLoader, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
        """Loss and metric over (a limited number of) validation batches (see engine.evaluate)."""
        result = evaluate(
            self.eval_net,
            self.task,
            loader,
            self.device,
            self.settings.limit_val_batches,
            amp_dtype=self.precision.autocast_dtype,
            memory_format=self.memory_format,
            distributed=self.context.enabled,
            progress=lambda batches, count: self._progress(batches, count, f"val {epoch}"),
        )
        key = self.task.metric_key
        summary = {"val_loss": result["loss"], f"val_{key}": result[key], "val_time_s": result["time_s"]}
        return summary, result["details"]

    def _rank_progress(self, progress: dict[str, Any]) -> dict[str, Any]:
        """This rank's partial sums from a mid-epoch checkpoint's progress."""
        ranks = progress.get("ranks")
        if ranks is None and not self.context.enabled:
            return progress
        if ranks is None or len(ranks) != self.context.world_size:
            raise ConfigError(
                f"the checkpoint stopped mid-epoch with {len(ranks) if ranks else 1} process(es); resume it with "
                f"the same number (this run has {self.context.world_size}), or from an epoch-end checkpoint"
            )
        return ranks[self.context.rank]

    def offset_statistics(self) -> dict[str, tuple[float, float]]:
        """Mean and max |offset| per deformable layer over the last training epoch."""
        stats = {}
        for name, layer in deformable_layers(self.model):
            popped = layer.pop_offset_stats()
            if popped is not None:
                stats[name] = popped
        return stats

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> FitResult:
        """Train the remaining epochs, validating and checkpointing after each.

        A non-finite loss stops the run (``result.diverged``) without touching the checkpoints.
        SIGTERM/SIGINT finish the current step, write ``last.pt`` and raise
        :class:`TrainingStoppedError`.
        """
        result = self.result
        key = self.task.metric_key
        with self._signals:
            for epoch in range(self.epochs_done + 1, self.settings.epochs + 1):
                try:
                    train = self.train_epoch(train_loader, epoch)
                except _DivergedError as diverged:
                    log.error("training diverged: %s; the last good checkpoint is kept", diverged)
                    result.diverged, result.divergence = True, str(diverged)
                    break
                val, details = self.validate(val_loader, epoch)
                offsets = self.offset_statistics()
                record = {"epoch": epoch, **train, **val, "lr": self.optimizer.param_groups[0]["lr"]}
                if offsets:
                    record["offset_abs_mean"] = statistics.fmean(mean for mean, _ in offsets.values())
                    record["offset_abs_max"] = max(peak for _, peak in offsets.values())
                if not math.isfinite(record["train_loss"]) or not math.isfinite(record["val_loss"]):
                    log.error("training diverged: non-finite loss after epoch %d; last good checkpoint kept", epoch)
                    result.diverged, result.divergence = True, f"non-finite loss after epoch {epoch}"
                    result.epochs.append(record)
                    break
                result.epochs.append(record)
                result.final_details = details
                self._log_epoch(record, offsets)
                if self.epoch_end is not None:
                    self.epoch_end(epoch)
                self.epochs_done = epoch
                improved = record[f"val_{key}"] > self.best
                self.best = max(self.best, record[f"val_{key}"])
                self._save()
                if improved and self.context.is_main:
                    save_checkpoint(self.checkpoint_dir / "best.pt", self.state_dict())
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
                _, stop = self._agree()
                if stop:
                    raise TrainingStoppedError(stop, self.last_checkpoint, epoch, 0)
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
