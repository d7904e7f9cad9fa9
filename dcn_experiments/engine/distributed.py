"""DistributedDataParallel: process group, rank facts, reductions, the model wrapper.

Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` in the environment) or
by SLURM with several tasks per job (``SLURM_PROCID``/``SLURM_NTASKS``, e.g. submitit with
``tasks_per_node`` > 1), the process group uses gloo for CPU tensors and nccl for CUDA tensors.
``dataset.batch_size`` is per process: the global batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dcn_experiments.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its rank, the number of processes, its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes TensorBoard, metrics.json, checkpoints and reports."""
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        """The process group's backend(s), None when not distributed."""
        return dist.get_backend() if self.enabled and dist.is_initialized() else None


def _slurm_environment() -> None:
    """Fill torchrun's variables from SLURM's for a job with several tasks (submitit, srun)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        first = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        first = nodes.split(",")[0]
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"],
        WORLD_SIZE=os.environ["SLURM_NTASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", first),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)),
    )


def context_from_environment() -> DistContext:
    """The rank facts torchrun (or SLURM) gave this process; a 1-process context otherwise."""
    _slurm_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed() -> DistContext:
    """Join the job's process group (once per process) when started by torchrun/SLURM."""
    context = context_from_environment()
    if context.enabled and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(context.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined the process group (%s)", context.rank, context.world_size, backend)
    return context


def shutdown_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or ``max``) ``tensor`` over all ranks in place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        work = tensor
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            # nccl reduces CUDA tensors only; the trainer's loss sums and stop flags live on the CPU.
            work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def device_for_rank(device: torch.device, context: DistContext) -> torch.device:
    """On CUDA, the GPU of this local rank; CPU stays CPU."""
    if device.type == "cuda" and context.enabled:
        return torch.device("cuda", context.local_rank % torch.cuda.device_count())
    return device


class CPUSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over all ranks' batches (on CPU, where
    ``nn.SyncBatchNorm`` refuses to run); the gradient flows through the all-reduce."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch norm with the global batch's mean and variance in training, running stats otherwise."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        with warnings.catch_warnings():  # deprecated, but its replacement has no backward
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        x = input.float()
        channels = x.shape[1]
        wide = x.double()  # sum of squares minus squared sum: float32 would cancel digits away
        local = torch.cat(
            [wide.sum((0, 2, 3)), (wide * wide).sum((0, 2, 3)), wide.new_full((1,), float(x.numel() // channels))]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            total = differentiable_all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm_cpu(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`CPUSyncBatchNorm2d` (same state)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = CPUSyncBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced.to(next(child.buffers(), torch.empty(0)).device))
        else:
            convert_sync_batchnorm_cpu(child)
    return module


def wrap_model(model: nn.Module, device: torch.device, context: DistContext, sync_batchnorm: bool) -> nn.Module:
    """``model`` for the training step: DistributedDataParallel in a multi-process job, else itself.

    ``sync_batchnorm`` converts the BatchNorm layers in place (evaluation uses them too, with their
    running statistics): batch statistics over the global batch, as a 1-process run computes them.
    """
    if not context.enabled:
        if sync_batchnorm:
            log.info("trainer.sync_batchnorm=true has no effect in a single process")
        return model
    if sync_batchnorm:
        if device.type == "cuda":
            if nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
                raise ConfigError("trainer.sync_batchnorm: the model's top module is a BatchNorm layer")
        else:
            convert_sync_batchnorm_cpu(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
