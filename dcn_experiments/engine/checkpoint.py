"""Self-describing checkpoints, written atomically (dcn_experiments.atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dcn_experiments.atomic import atomic_write
from dcn_experiments.errors import DataError

CHECKPOINT_FORMAT = "dcn-experiments-checkpoint"  # the "format" key of a resumable training checkpoint


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees a partial file.

    The payload must hold only tensors and plain containers/scalars, so that it loads with
    ``torch.load(path, weights_only=True)``.
    """
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (safely, ``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A dcn-train checkpoint (weights + resolved config); :class:`DataError` with one line naming
    ``path`` for a truncated, foreign or non-PyTorch file."""
    try:
        payload = load_checkpoint(path)
    except Exception as error:  # truncated zip, unsafe or foreign pickle, not a torch file at all
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{path}: not a readable dcn-train checkpoint ({type(error).__name__}: {first[:160]}); it may be truncated"
        ) from None
    if not (isinstance(payload, dict) and isinstance(payload.get("model"), dict) and payload.get("config")):
        raise DataError(f"{path}: not a dcn-train checkpoint (it lacks the model weights or the config)")
    return payload
