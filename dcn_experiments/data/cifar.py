"""CIFAR-10 through ``torchvision.datasets.CIFAR10`` (official python-pickle batches)."""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from dcn_experiments.data.registry import DATASETS, DataSplits
from dcn_experiments.data.transforms import CIFAR10_MEAN, CIFAR10_STD, classification_transforms
from dcn_experiments.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

log = logging.getLogger(__name__)

# torchvision is imported only when CIFAR-10 is opened or verified: ``import torchvision`` pulls in
# torch._dynamo (~1.4 s), which every CLI start would otherwise pay.


@functools.cache
def _cifar10_batches_class() -> type[CIFAR10]:
    from torchvision.datasets import CIFAR10

    class CIFAR10Batches(CIFAR10):
        """``torchvision.datasets.CIFAR10`` that accepts any batches in the official python-pickle format.

        torchvision verifies the md5 of the official files on open; here opening only requires that the
        files exist, so subsets and re-packed batches load too, and :func:`verify_cifar10` checks the
        official checksums when ``dataset.verify`` is true. Unreadable pickles still fail loudly on load.
        """

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all((folder / name).is_file() for name in names)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    # importable (and picklable, e.g. for spawned loader workers) as dcn_experiments.data.cifar.CIFAR10Batches
    CIFAR10Batches.__module__, CIFAR10Batches.__qualname__ = __name__, "CIFAR10Batches"
    return CIFAR10Batches


def __getattr__(name: str):
    """``CIFAR10Batches`` is defined on first access (it subclasses torchvision's ``CIFAR10``)."""
    if name == "CIFAR10Batches":
        return _cifar10_batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def verify_cifar10(folder: Path) -> None:
    """Check each file of ``cifar-10-batches-py`` against torchvision's official md5; ``DataError`` names the first
    file that differs."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import calculate_md5

    official = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    for name, md5 in official:
        if calculate_md5(folder / name) != md5:
            raise DataError(
                f"CIFAR-10 file {folder / name} fails the official md5 check; re-download, or "
                "dataset.verify=false for a hand-made set"
            )


def _open_cifar10(root: Path, train: bool, download: bool, transform) -> CIFAR10:
    batches = _cifar10_batches_class()
    try:
        return batches(str(root), train=train, download=download, transform=transform)
    except RuntimeError as error:
        if "not found or corrupted" in str(error):
            hint = (
                f"; dataset.root points at cifar-10-batches-py itself, use its parent {root.parent}"
                if root.name == batches.base_folder
                else "; set dataset.root to the folder that holds cifar-10-batches-py, or add dataset.download=true "
                "to fetch it"
            )
            raise DataError(f"CIFAR-10 not found at {root / batches.base_folder}{hint}") from None
        raise
    except OSError as error:  # network failure while downloading, unreadable files
        action = "download CIFAR-10 into" if download else "read CIFAR-10 from"
        raise DataError(
            f"could not {action} {root} ({error}); copy cifar-10-batches-py there by hand if this machine is offline"
        ) from None
    except Exception as error:
        raise DataError(f"CIFAR-10 files under {root / batches.base_folder} are unreadable ({error})") from None


@DATASETS.register("cifar10", tasks=("classification",))
def cifar10(
    task: str,
    seed: int,
    root: str = "data",
    download: bool = False,
    augment: bool = True,
    normalize: bool = True,
    verify: bool = True,
) -> DataSplits:
    """CIFAR-10 train (50k) / test (10k) as train / val; ``verify`` checks the official md5 of every file."""
    del task, seed
    root_path = Path(root).expanduser()
    train = _open_cifar10(
        root_path, True, download, classification_transforms(True, augment, normalize, CIFAR10_MEAN, CIFAR10_STD)
    )
    caveats = []
    folder = root_path / train.base_folder
    if verify:
        verify_cifar10(folder)
    else:
        caveats.append(f"CIFAR-10 md5 check skipped (dataset.verify=false): {folder} may not be the official set")
        log.warning("%s; its numbers are not comparable to official CIFAR-10 results", caveats[-1])
    val = _open_cifar10(
        root_path, False, download, classification_transforms(False, augment, normalize, CIFAR10_MEAN, CIFAR10_STD)
    )
    return DataSplits(train, val, num_classes=len(train.classes), class_names=list(train.classes), caveats=caveats)
