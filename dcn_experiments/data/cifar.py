"""CIFAR-10 through ``torchvision.datasets.CIFAR10`` (official python-pickle batches)."""

from __future__ import annotations

import pickle
from pathlib import Path

from torchvision.datasets import CIFAR10

from dcn_experiments.data.registry import DATASETS, DataSplits
from dcn_experiments.data.transforms import CIFAR10_MEAN, CIFAR10_STD, classification_transforms
from dcn_experiments.errors import DataError


class CIFAR10Batches(CIFAR10):
    """``torchvision.datasets.CIFAR10`` that accepts any batches in the official python-pickle format.

    torchvision verifies the md5 of the official files; we only require that the files exist, so
    subsets and re-packed batches load too. Unreadable pickles still fail loudly on load.
    """

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((folder / name).is_file() for name in names)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


def _open_cifar10(root: Path, train: bool, download: bool, transform) -> CIFAR10:
    try:
        return CIFAR10Batches(str(root), train=train, download=download, transform=transform)
    except RuntimeError as error:
        if "not found or corrupted" in str(error):
            raise DataError(
                f"CIFAR-10 not found at {root / 'cifar-10-batches-py'}; set dataset.root to the folder that "
                "holds cifar-10-batches-py, or add dataset.download=true to fetch it"
            ) from None
        raise
    except OSError as error:  # network failure while downloading, unreadable files
        action = "download CIFAR-10 into" if download else "read CIFAR-10 from"
        raise DataError(
            f"could not {action} {root} ({error}); copy cifar-10-batches-py there by hand if this machine is offline"
        ) from None
    except Exception as error:
        raise DataError(f"CIFAR-10 files under {root / 'cifar-10-batches-py'} are unreadable ({error})") from None


@DATASETS.register("cifar10", tasks=("classification",))
def cifar10(
    task: str,
    seed: int,
    root: str = "data",
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
) -> DataSplits:
    """CIFAR-10 train (50k) / test (10k) as train / val."""
    del task, seed
    root_path = Path(root).expanduser()
    train = _open_cifar10(
        root_path, True, download, classification_transforms(True, augment, normalize, CIFAR10_MEAN, CIFAR10_STD)
    )
    val = _open_cifar10(
        root_path, False, download, classification_transforms(False, augment, normalize, CIFAR10_MEAN, CIFAR10_STD)
    )
    return DataSplits(train, val, num_classes=len(train.classes), class_names=list(train.classes))
