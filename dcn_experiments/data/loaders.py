"""DataLoaders: seeded shuffling and workers, pinned memory on CUDA."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dcn_experiments.errors import ConfigError, DataError


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int, device: torch.device, name: str
) -> DataLoader:
    """A DataLoader whose order and augmentations depend only on ``seed``."""
    if batch_size < 1:
        raise ConfigError(f"dataset.batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"dataset.num_workers={num_workers} must be >= 0")
    if len(dataset) == 0:
        raise DataError(f"the {name} split is empty; check dataset.root and its contents")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
