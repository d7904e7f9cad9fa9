"""COCO instance annotations read as semantic segmentation (pycocotools).

Per image, the semantic mask is painted from the instance masks (polygons, RLE and crowd regions
via ``COCO.annToMask``). Category ids are remapped to contiguous ``1..K`` (0 = background) over the
selected categories. Overlap policy (``overlap``):

* ``ignore`` (default, as torchvision's segmentation reference): a pixel covered by instances of
  two different categories is marked ``ignore_index`` and left out of loss and metrics.
* ``smaller``: instances are painted from largest to smallest area, so the smaller (usually the
  front) object wins.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from dcn_experiments.errors import ConfigError, DataError

OVERLAP_POLICIES = ("ignore", "smaller")


def load_coco(annotation_file: Path) -> COCO:
    """Parse an instances JSON into a ``COCO`` index; bad files raise ``DataError`` naming the file."""
    if not annotation_file.is_file():
        raise DataError(
            f"COCO annotation file not found: {annotation_file}; set dataset.root to a folder with "
            "annotations/instances_<split>.json"
        )
    try:
        data = json.loads(annotation_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"COCO annotation file is not valid JSON: {annotation_file} ({error})") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise DataError(
            f"COCO annotation file lacks 'images', 'annotations' or 'categories': {annotation_file}; "
            "is it an instances_*.json file?"
        )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as error:
            raise DataError(f"COCO annotation file is malformed: {annotation_file} (missing field {error})") from None
    return coco


def select_categories(coco: COCO, wanted: Sequence[str | int] | None) -> list[int]:
    """COCO category ids to keep (all when ``wanted`` is empty), validating names and ids."""
    by_name = {c["name"]: c["id"] for c in coco.dataset["categories"]}
    ids = set(by_name.values())
    if not wanted:
        return sorted(ids)
    chosen = []
    for item in wanted:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            if int(item) not in ids:
                raise ConfigError(f"dataset.categories: unknown category id {item}; known ids: {sorted(ids)}")
            chosen.append(int(item))
        elif item in by_name:
            chosen.append(by_name[item])
        else:
            raise ConfigError(
                f"dataset.categories: unknown category {item!r}; known names: {', '.join(sorted(by_name))}"
            )
    return sorted(set(chosen))


class CocoSegmentation(Dataset):
    """Semantic segmentation view of a COCO instances file: items are ``transform(image, mask)``."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        categories: Sequence[str | int] | None = None,
        transform: Callable | None = None,
        overlap: str = "ignore",
        ignore_index: int = 255,
    ) -> None:
        if overlap not in OVERLAP_POLICIES:
            raise ConfigError(f"dataset.overlap={overlap!r} is not valid; choose one of {', '.join(OVERLAP_POLICIES)}")
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(self.annotation_file)
        self.category_ids = select_categories(self.coco, categories)
        self.label_of = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}
        self.class_names = ["background"] + [self.coco.cats[c]["name"] for c in self.category_ids]
        self.transform, self.overlap, self.ignore_index = transform, overlap, ignore_index
        self.image_ids = sorted(self.coco.imgs)
        if not self.image_ids:
            raise DataError(f"COCO annotation file lists no images: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder not found: {self.image_dir}; it must sit next to annotations/")
        for image_id in self.image_ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DataError(
                    f"COCO image file missing: {path} (image id {image_id} in {self.annotation_file}); "
                    "restore the image or remove it from the annotations"
                )

    @property
    def num_classes(self) -> int:
        """Number of output classes, background included."""
        return len(self.category_ids) + 1

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """The uint8 (H, W) class-index mask of one image, painted from its instance masks."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["category_id"] in self.label_of]
        if self.overlap == "smaller":
            anns = sorted(anns, key=lambda a: -a.get("area", 0))
        claimed = np.zeros_like(mask, dtype=bool) if self.overlap == "ignore" else None
        for ann in anns:
            try:
                region = self.coco.annToMask(ann).astype(bool)
            except Exception as error:
                raise DataError(
                    f"cannot decode segmentation of annotation {ann.get('id')} in {self.annotation_file}: {error}"
                ) from None
            label = self.label_of[ann["category_id"]]
            if claimed is not None:
                conflict = region & claimed & (mask != label)
                mask[region & ~claimed] = label
                mask[conflict] = self.ignore_index
                claimed |= region
            else:
                mask[region] = label
        return mask

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"cannot read COCO image {path}: {error}") from None
        mask = self.semantic_mask(image_id)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise DataError(
                f"COCO image {path} is {image.size[0]}x{image.size[1]} but its annotation says "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask
