"""Resolve the ``device`` config option to a ``torch.device``."""

from __future__ import annotations

import torch

from dcn_experiments.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without CUDA is a ``ConfigError``."""
    if name not in DEVICE_CHOICES:
        raise ConfigError(f"device={name!r} is not valid; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda was requested but CUDA is not available on this machine; use device=cpu or device=auto"
        )
    return torch.device(name)
