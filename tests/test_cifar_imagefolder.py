"""CIFAR-10 from official-format pickle batches written by the test; image folders; real samples."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_experiments.data import DATASETS
from dcn_experiments.errors import DataError

from .conftest import SHARED_DATA


def write_fake_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    """Write cifar-10-batches-py/ in the official python-pickle format (tiny batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        # The official files are Python 2 pickles of str keys; Python 3 str keys load the same way.
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder


def test_cifar10_loads_official_pickle_batches(tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path)
    splits = DATASETS.build(
        "cifar10", task="classification", seed=0, root=str(tmp_path), augment=False, normalize=False, verify=False
    )
    assert len(splits.train) == 20 and len(splits.val) == 4 and splits.num_classes == 10
    image, label = splits.val[0]
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    expected = torch.from_numpy(raw["data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(image, expected) and label == raw["labels"][0]  # ToTensor only: exact pixels


def test_cifar10_normalise_and_augment(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    splits = DATASETS.build(
        "cifar10", task="classification", seed=0, root=str(tmp_path), augment=True, normalize=True, verify=False
    )
    image, _ = splits.train[0]
    assert image.shape == (3, 32, 32) and image.min() < 0


def test_cifar10_missing_offline_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found at .*cifar-10-batches-py.*dataset.download=true"):
        DATASETS.build("cifar10", verify=False, task="classification", seed=0, root=str(tmp_path / "nowhere"))


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs dataset.root"):
        DATASETS.build("imagefolder", task="classification", seed=0, root=None)
    with pytest.raises(DataError, match="does not exist"):
        DATASETS.build("imagefolder", task="classification", seed=0, root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        DATASETS.build("imagefolder", task="classification", seed=0, root=str(tmp_path / "empty"))


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-subset").is_dir(), reason="../shared/data/cifar10-subset absent")
def test_real_cifar10_subset_through_imagefolder(tmp_path: Path) -> None:
    # Two classes are enough to check real PNGs flow through the CIFAR-10 statistics and transforms.
    root = tmp_path / "subset"
    for split in ("train", "test"):
        for cls in ("cat", "ship"):
            shutil.copytree(SHARED_DATA / "cifar10-subset" / split / cls, root / split / cls)
    splits = DATASETS.build(
        "imagefolder",
        task="classification",
        seed=0,
        root=str(root),
        val_split="test",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
    assert splits.class_names == ["cat", "ship"]
    image, label = splits.val[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert -3 < image.mean() < 3
