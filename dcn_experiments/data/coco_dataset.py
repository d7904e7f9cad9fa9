"""The ``coco`` dataset option: official COCO layout under ``dataset.root``."""

from __future__ import annotations

from pathlib import Path

from dcn_experiments.data.coco import CocoSegmentation
from dcn_experiments.data.registry import DATASETS, DataSplits
from dcn_experiments.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform, check_image_size
from dcn_experiments.errors import DataError


@DATASETS.register("coco", tasks=("segmentation",))
def coco(
    task: str,
    seed: int,
    root: str | None = None,
    train_split: str = "train2017",
    val_split: str = "val2017",
    categories: list[str | int] | None = None,
    image_size: int = 128,
    augment: bool = True,
    normalize: bool = True,
    scale_range: tuple[float, float] = (0.75, 1.5),
    overlap: str = "ignore",
    ignore_index: int = 255,
) -> DataSplits:
    """``root/<split>/*.jpg`` + ``root/annotations/instances_<split>.json`` for train and val."""
    del task, seed
    check_image_size(image_size)
    if not root:
        raise DataError("dataset=coco needs dataset.root=PATH (holding train2017/, val2017/ and annotations/)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset.root does not exist: {root_path}; point it at a COCO folder with annotations/")
    splits = {}
    for name, split, is_train in (("train", train_split, True), ("val", val_split, False)):
        transform = SegmentationTransform(
            image_size,
            train=is_train and augment,
            normalize=normalize,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            scale_range=tuple(scale_range),
            ignore_index=ignore_index,
        )
        splits[name] = CocoSegmentation(
            root_path / split,
            root_path / "annotations" / f"instances_{split}.json",
            categories=categories,
            transform=transform,
            overlap=overlap,
            ignore_index=ignore_index,
        )
    check_same_categories(splits["train"], splits["val"])
    return DataSplits(
        splits["train"],
        splits["val"],
        num_classes=splits["val"].num_classes,
        class_names=splits["val"].class_names,
        ignore_index=ignore_index,
    )


def check_same_categories(train: CocoSegmentation, val: CocoSegmentation) -> None:
    """The train and val annotation files must map the selected category ids to the same names."""
    names = [{c: split.coco.cats[c]["name"] for c in split.category_ids} for split in (train, val)]
    if names[0] != names[1]:
        differ = sorted(set(names[0].items()) ^ set(names[1].items()))
        raise DataError(
            f"categories differ between {train.annotation_file} and {val.annotation_file} "
            f"(id: name pairs in only one of them: {', '.join(f'{i}: {n}' for i, n in differ[:6])}); "
            "both splits need the same categories list, or pick common ones with dataset.categories"
        )
