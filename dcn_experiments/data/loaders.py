"""DataLoaders: seeded shuffling and workers, pinned memory on CUDA, one shard per DDP rank.

Under DDP every rank draws the same permutation per epoch from a generator seeded alike (what
``DistributedSampler.set_epoch`` achieves with ``seed + epoch``; here the generator's state is also
the checkpointed data order, so a resumed run sees the same order) and takes every
``world_size``-th index from its rank on: together the ranks' batches of step k hold the samples of
a 1-process run's batch k with ``batch_size * world_size``. Training pads the permutation with its
first indices to a multiple of ``world_size`` (as ``DistributedSampler`` does) so that every rank
runs the same number of steps; validation is sharded without padding, so no sample is seen twice.
"""

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
    next epoch can start ``skip`` samples (of this rank) in: a run resumed mid-epoch sees the rest of
    the very same order without loading the batches it already trained on. With ``world_size`` > 1,
    rank ``rank``'s shard of the padded permutation (see the module docstring)."""

    def __init__(self, dataset: Dataset, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.generator, self.skip = len(dataset), generator, 0
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        padded = order + order[: len(self) * self.world_size - self.size]
        return iter(padded[self.rank :: self.world_size][self.skip :])


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``0..len(dataset)-1`` in order, every index on exactly one rank."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    device: torch.device,
    name: str,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader whose order and augmentations depend only on ``seed`` (shuffled loaders use a
    :class:`ResumableRandomSampler`); ``rank``/``world_size`` select a DDP rank's shard."""
    if batch_size < 1:
        raise ConfigError(f"dataset.batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"dataset.num_workers={num_workers} must be >= 0")
    if len(dataset) == 0:
        raise DataError(f"the {name} split is empty; check dataset.root and its contents")
    if len(dataset) < world_size:
        raise DataError(f"the {name} split has {len(dataset)} samples, fewer than the {world_size} DDP processes")
    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        sampler: Sampler[int] | None = ResumableRandomSampler(dataset, generator, rank, world_size)
    else:
        sampler = ShardSampler(dataset, rank, world_size) if world_size > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
