"""Semantic masks from COCO instances: polygons, RLE, crowd, overlaps, remap, subsets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dcn_experiments.data.coco import CocoSegmentation
from dcn_experiments.errors import ConfigError, DataError

from .conftest import SHARED_DATA

H, W = 10, 12


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    # uncompressed: column-major run lengths starting with zeros
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def write_tiny_coco(root: Path) -> dict[str, np.ndarray]:
    """Three images: polygon + compressed RLE overlap, crowd uncompressed RLE, none. Returns masks by hand."""
    (root / "images").mkdir(parents=True)
    for i in (1, 2, 3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
    square = np.zeros((H, W), bool)
    square[2:6, 2:6] = True  # polygon covering pixel centres 2..5
    bar = np.zeros((H, W), bool)
    bar[4:8, 4:10] = True  # RLE, overlaps the square at [4:6, 4:6]
    crowd = np.zeros((H, W), bool)
    crowd[0:3, 6:12] = True
    polygon = [1.5, 1.5, 5.5, 1.5, 5.5, 5.5, 1.5, 5.5]  # x, y pairs
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 18,
            "segmentation": [polygon],
            "area": 16.0,
            "bbox": [2, 2, 4, 4],
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "segmentation": _rle(bar, True),
            "area": 24.0,
            "bbox": [4, 4, 6, 4],
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 90,
            "segmentation": _rle(crowd, False),
            "area": 18.0,
            "bbox": [6, 0, 6, 3],
            "iscrowd": 1,
        },
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}],
    }
    (root / "instances.json").write_text(json.dumps(data))
    return {"square": square, "bar": bar, "crowd": crowd}


def test_masks_match_hand_computed_with_remap_and_overlap_ignored(tmp_path: Path) -> None:
    shapes = write_tiny_coco(tmp_path)
    ds = CocoSegmentation(tmp_path / "images", tmp_path / "instances.json")
    assert ds.class_names == ["background", "car", "dog", "toothbrush"] and ds.num_classes == 4
    expected = np.zeros((H, W), np.uint8)
    expected[shapes["square"]] = 2  # dog: COCO id 18 -> 2
    expected[shapes["bar"]] = 1  # car: COCO id 3 -> 1
    expected[shapes["square"] & shapes["bar"]] = 255  # different categories overlap -> ignore
    np.testing.assert_array_equal(ds.semantic_mask(1), expected)
    crowd = np.where(shapes["crowd"], 3, 0).astype(np.uint8)  # toothbrush: 90 -> 3, crowd region labelled
    np.testing.assert_array_equal(ds.semantic_mask(2), crowd)
    np.testing.assert_array_equal(ds.semantic_mask(3), np.zeros((H, W), np.uint8))  # no annotations
    image, mask = ds[0]
    assert image.size == (W, H) and mask.shape == (H, W)


def test_smaller_instance_wins_policy(tmp_path: Path) -> None:
    shapes = write_tiny_coco(tmp_path)
    ds = CocoSegmentation(tmp_path / "images", tmp_path / "instances.json", overlap="smaller")
    mask = ds.semantic_mask(1)
    assert (mask[shapes["square"]] == 2).all()  # the square (area 16) is painted over the bar (24)


def test_category_subset_by_name_and_id(tmp_path: Path) -> None:
    shapes = write_tiny_coco(tmp_path)
    ds = CocoSegmentation(tmp_path / "images", tmp_path / "instances.json", categories=["dog", 90])
    assert ds.class_names == ["background", "dog", "toothbrush"]
    expected = np.where(shapes["square"], 1, 0).astype(np.uint8)  # the car is now background
    np.testing.assert_array_equal(ds.semantic_mask(1), expected)
    with pytest.raises(ConfigError, match="unknown category 'cat'"):
        CocoSegmentation(tmp_path / "images", tmp_path / "instances.json", categories=["cat"])


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        CocoSegmentation(tmp_path, tmp_path / "nope.json")


def test_corrupt_json(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON: .*bad.json"):
        CocoSegmentation(tmp_path, tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(DataError, match="lacks 'images'"):
        CocoSegmentation(tmp_path, tmp_path / "other.json")


def test_annotation_pointing_to_missing_image(tmp_path: Path) -> None:
    write_tiny_coco(tmp_path)
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(DataError, match=r"image file missing: .*2.png \(image id 2"):
        CocoSegmentation(tmp_path / "images", tmp_path / "instances.json")


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "coco-mini").is_dir(), reason="../shared/data/coco-mini absent")
def test_real_coco_mini_val_masks() -> None:
    root = SHARED_DATA / "coco-mini"
    ds = CocoSegmentation(root / "val2017", root / "annotations" / "instances_val2017.json")
    assert ds.num_classes == 81 and len(ds) == 158
    labelled = 0
    for image_id in ds.image_ids[:20]:
        mask = ds.semantic_mask(image_id)
        assert mask.shape == (ds.coco.imgs[image_id]["height"], ds.coco.imgs[image_id]["width"])
        assert set(np.unique(mask).tolist()) <= set(range(81)) | {255}
        labelled += (mask > 0).any()
    assert labelled == 20  # every sample image has annotations
    crowd_images = {a["image_id"] for a in ds.coco.dataset["annotations"] if a["iscrowd"]}
    crowd_mask = ds.semantic_mask(sorted(crowd_images)[0])
    assert (crowd_mask > 0).any()
