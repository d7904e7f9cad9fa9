"""DataLoaders: seeded shuffling and workers, pinned memory on CUDA."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcn_experiments.errors import ConfigError, DataError


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ResumableRandomSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``generator`` (as ``RandomSampler`` does), whose
    next epoch can start ``skip`` samples in: a run resumed mid-epoch sees the rest of the very same
    order without loading the batches it already trained on."""

    def __init__(self, dataset: Dataset, generator: torch.Generator) -> None:
        self.size, self.generator, self.skip = len(dataset), generator, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        return iter(order[self.skip :])


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int, device: torch.device, name: str
) -> DataLoader:
    """A DataLoader whose order and augmentations depend only on ``seed`` (shuffled loaders use a
    :class:`ResumableRandomSampler`)."""
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
        sampler=ResumableRandomSampler(dataset, generator) if shuffle else None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
