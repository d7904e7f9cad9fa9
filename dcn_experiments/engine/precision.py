"""Numeric precision, memory layout and compilation of a run (``trainer.precision``,
``trainer.channels_last``, ``trainer.compile``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dcn_experiments.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: float32 throughout) and whether a GradScaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None

    @property
    def uses_scaler(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of a forward pass (disabled at 32)."""
        return torch.autocast(
            device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
        )


def resolve_precision(value: object, device: torch.device) -> Precision:
    """``trainer.precision`` (32, bf16 or 16; Hydra reads 32 and 16 as integers) for ``device``."""
    name = str(value).strip().lower()
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={value} is not valid; choose one of {', '.join(PRECISIONS)}")
    if name == "16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=16 needs CUDA (float16 autocast with a GradScaler); on {device.type} "
            "use trainer.precision=bf16 or 32"
        )
    return Precision(name, PRECISIONS[name])


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` (graph breaks allowed) when ``enabled``, else ``module`` itself."""
    if not enabled:
        return module
    return torch.compile(module, fullgraph=False)


def deformable_precision_note(precision: Precision, usage: dict[str, int]) -> str | None:
    """A sentence when the deformable layers computed in another dtype than the run's autocast dtype
    (on CPU the op computes bfloat16 inputs in float32), else None."""
    if precision.autocast_dtype is None or not usage:
        return None
    wanted = str(precision.autocast_dtype).removeprefix("torch.")
    other = sorted(dtype for dtype in usage if dtype != wanted)
    if not other:
        return None
    return (
        f"trainer.precision={precision.name}: the deformable layers computed in {'+'.join(other)} "
        f"({sum(usage[d] for d in other)} of {sum(usage.values())} calls), the other layers in {wanted}; "
        "time ratios deformable/regular under this precision favour the regular arm"
    )
