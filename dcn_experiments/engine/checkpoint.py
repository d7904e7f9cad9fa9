"""Self-describing checkpoints, written atomically (dcn_experiments.atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dcn_experiments.atomic import atomic_write


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
