"""The embedded ``shapes`` dataset: offline, procedural, deterministic from the seed.

Classification: one shape per 32x32 image (8 classes). Segmentation: several shapes per image,
written once as a COCO-format set (PNG images + ``instances_<split>.json`` with RLE masks) under
``dataset.root`` and read back through the same COCO loader as real COCO. Both are cached under
``dataset.root`` keyed by every setting that changes the pixels, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from dcn_experiments.atomic import atomic_write
from dcn_experiments.data.coco import CocoSegmentation
from dcn_experiments.data.registry import DATASETS, DataSplits
from dcn_experiments.data.shapes_render import SHAPE_CLASSES, render_scene, scene_rng
from dcn_experiments.data.transforms import SegmentationTransform, check_image_size, classification_transforms
from dcn_experiments.errors import ConfigError

RENDER_VERSION = 3  # bump when the renderer changes, so caches are rebuilt
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.25, 0.25, 0.25)
DEFAULT_ELASTIC = 0.025  # warp amplitude per wave, as a fraction of the image size
SEGMENTATION_SCALE = (0.25, 0.4)  # shape radius range (fraction of the image size) in segmentation scenes


def shape_class_indices(names: list[str] | None) -> tuple[int, ...]:
    """Indices into ``SHAPE_CLASSES`` of the chosen class names (all when ``names`` is empty)."""
    if not names:
        return tuple(range(len(SHAPE_CLASSES)))
    unknown = [n for n in names if n not in SHAPE_CLASSES]
    if unknown or len(set(names)) < 2:
        raise ConfigError(
            f"dataset.classes={list(names)}: choose at least 2 distinct names from {', '.join(SHAPE_CLASSES)}"
        )
    return tuple(sorted({SHAPE_CLASSES.index(n) for n in names}))


def _cache_key(**settings: object) -> str:
    text = json.dumps({"version": RENDER_VERSION, **settings}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def render_classification_split(
    seed: int,
    split: str,
    count: int,
    image_size: int,
    elastic: float = DEFAULT_ELASTIC,
    classes: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (count, S, S, 3) uint8 and labels (count,) int64 of one split."""
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for index in range(count):
        scene = render_scene(scene_rng(seed, split, index), image_size, elastic=elastic, classes=classes)
        images[index], labels[index] = scene.image, scene.labels[0]
    return images, labels


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def cached_classification_split(
    root: Path, seed: int, split: str, count: int, image_size: int, elastic: float, classes: tuple[int, ...]
):
    """Load one split from the cache under ``root``, rendering and saving it on first use."""
    key = _cache_key(
        task="classification", seed=seed, split=split, count=count, size=image_size, elastic=elastic, classes=classes
    )
    path = root / "shapes" / f"classification-{split}-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["images"], data["labels"]
    images, labels = render_classification_split(seed, split, count, image_size, elastic, classes)
    _atomic_save_npz(path, images=images, labels=labels)
    return images, labels


class ArrayImageDataset(Dataset):
    """In-memory uint8 images with integer labels, passed through ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def write_segmentation_split(
    folder: Path,
    seed: int,
    split: str,
    count: int,
    image_size: int,
    max_shapes: int,
    elastic: float,
    classes: tuple[int, ...],
) -> None:
    """Render ``count`` scenes and write them as a COCO set: ``<split>/*.png`` + annotations JSON."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = scene_rng(seed, split, index)
        scene = render_scene(
            rng,
            image_size,
            num_shapes=int(rng.integers(1, max_shapes + 1)),
            scale_range=SEGMENTATION_SCALE,
            elastic=elastic,
            classes=classes,
        )
        file_name = f"{index:06d}.png"
        Image.fromarray(scene.image).save(folder / split / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for mask, label in zip(scene.masks, scene.labels, strict=True):
            if not mask.any():
                continue  # fully occluded
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": SHAPE_CLASSES[c], "supercategory": "shape"} for i, c in enumerate(classes)]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def cached_segmentation_set(
    root: Path,
    seed: int,
    train_size: int,
    val_size: int,
    image_size: int,
    max_shapes: int,
    elastic: float,
    classes: tuple[int, ...],
) -> Path:
    """The folder of the COCO-format shapes set for these settings, written atomically on first use."""
    key = _cache_key(
        task="segmentation",
        seed=seed,
        train=train_size,
        val=val_size,
        size=image_size,
        max_shapes=max_shapes,
        elastic=elastic,
        scale=SEGMENTATION_SCALE,
        classes=classes,
    )
    folder = root / "shapes" / f"segmentation-{key}"
    if (folder / "annotations" / "instances_val.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for split, count in (("train", train_size), ("val", val_size)):
            write_segmentation_split(staging, seed, split, count, image_size, max_shapes, elastic, classes)
        try:
            staging.rename(folder)
        except OSError:  # another run finished first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


@DATASETS.register("shapes", tasks=("classification", "segmentation"))
def shapes(
    task: str,
    seed: int,
    root: str = "data",
    image_size: int | None = None,
    train_size: int = 5000,
    val_size: int = 1000,
    normalize: bool = True,
    augment: bool = False,
    max_shapes: int = 3,
    elastic: float = DEFAULT_ELASTIC,
    classes: list[str] | None = None,
    overlap: str = "ignore",
    ignore_index: int = 255,
) -> DataSplits:
    """Procedural shapes (seeded by ``seed``) for classification or segmentation."""
    check_image_size(image_size)
    if elastic < 0:
        raise ConfigError(f"dataset.elastic={elastic} must be >= 0 (warp amplitude as a fraction of the image size)")
    if train_size < 1 or val_size < 1:
        raise ConfigError(f"dataset.train_size={train_size} and dataset.val_size={val_size} must be >= 1")
    chosen = shape_class_indices(classes)
    root_path = Path(root).expanduser()
    if task == "classification":
        size = image_size or 32
        tf_train = classification_transforms(True, augment, normalize, SHAPES_MEAN, SHAPES_STD)
        tf_val = classification_transforms(False, augment, normalize, SHAPES_MEAN, SHAPES_STD)
        train = ArrayImageDataset(
            *cached_classification_split(root_path, seed, "train", train_size, size, elastic, chosen), tf_train
        )
        val = ArrayImageDataset(
            *cached_classification_split(root_path, seed, "val", val_size, size, elastic, chosen), tf_val
        )
        return DataSplits(train, val, num_classes=len(chosen), class_names=[SHAPE_CLASSES[c] for c in chosen])
    size = image_size or 64
    folder = cached_segmentation_set(root_path, seed, train_size, val_size, size, max_shapes, elastic, chosen)
    splits = {}
    for split, is_train in (("train", True), ("val", False)):
        transform = SegmentationTransform(
            size,
            train=is_train and augment,
            normalize=normalize,
            mean=SHAPES_MEAN,
            std=SHAPES_STD,
            ignore_index=ignore_index,
        )
        splits[split] = CocoSegmentation(
            folder / split,
            folder / "annotations" / f"instances_{split}.json",
            transform=transform,
            overlap=overlap,
            ignore_index=ignore_index,
        )
    return DataSplits(
        splits["train"],
        splits["val"],
        num_classes=splits["val"].num_classes,
        class_names=splits["val"].class_names,
        ignore_index=ignore_index,
    )
