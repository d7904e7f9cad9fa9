"""Any class-per-folder image tree: ``root/train/<class>/*`` and ``root/<val_split>/<class>/*``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from dcn_experiments.data.registry import DATASETS, DataSplits
from dcn_experiments.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_size,
    classification_transforms,
)
from dcn_experiments.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB; an unreadable file raises ``DataError`` naming it (never skipped)."""
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({error}); replace or delete the file") from None


def _open_folder(folder: Path, transform) -> ImageFolder:
    # deferred: any torchvision import pulls torch._dynamo (~1.4 s) into every CLI start
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise DataError(
            f"image folder not found: {folder}; dataset.root must hold train/ and the validation folder "
            "(dataset.val_split), each with one sub-folder per class"
        )
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if loose:
        raise DataError(
            f"{folder} holds images directly ({loose[0]}, ...); move them into one sub-folder per class, "
            f"e.g. {folder / 'cat' / loose[0]}"
        )
    try:
        return ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as error:
        raise DataError(f"no images in {folder} ({error}); put images into one sub-folder per class") from None


@DATASETS.register("imagefolder", tasks=("classification",))
def imagefolder(
    task: str,
    seed: int,
    root: str | None = None,
    val_split: str = "val",
    image_size: int | None = None,
    augment: bool = True,
    normalize: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> DataSplits:
    """Train/validation image folders; classes are the sub-folder names (must match)."""
    del task, seed
    check_image_size(image_size)
    if not root:
        raise DataError("dataset=imagefolder needs dataset.root=PATH (a folder holding train/ and val/)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(
            f"dataset.root does not exist: {root_path}; point it at a folder holding train/ and {val_split}/"
        )
    found = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    if not (root_path / "train").is_dir() and found:
        raise DataError(
            f"{root_path} has no train/ folder (found {', '.join(found[:5])}/); dataset.root must hold train/<class>/ "
            f"and {val_split}/<class>/ (set dataset.val_split if the validation folder has another name)"
        )
    train = _open_folder(
        root_path / "train", classification_transforms(True, augment, normalize, mean, std, image_size)
    )
    val = _open_folder(
        root_path / val_split, classification_transforms(False, augment, normalize, mean, std, image_size)
    )
    if train.classes != val.classes:
        raise DataError(
            f"class folders differ between {root_path / 'train'} ({len(train.classes)} classes) and "
            f"{root_path / val_split} ({len(val.classes)}); both need the same class sub-folders"
        )
    return DataSplits(train, val, num_classes=len(train.classes), class_names=list(train.classes))
