"""The embedded shapes dataset: determinism, classes, caching, COCO-format segmentation set."""

from __future__ import annotations

import json

import numpy as np
import torch

from dcn_experiments.data import DATASETS
from dcn_experiments.data.shapes import render_classification_split
from dcn_experiments.data.shapes_render import SHAPE_CLASSES, render_scene, scene_rng


def test_same_seed_same_images_other_seed_other_images() -> None:
    a_images, a_labels = render_classification_split(seed=1, split="train", count=16, image_size=32)
    b_images, b_labels = render_classification_split(seed=1, split="train", count=16, image_size=32)
    c_images, _ = render_classification_split(seed=2, split="train", count=16, image_size=32)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


def test_train_and_val_differ_and_images_do_not_depend_on_count() -> None:
    train, _ = render_classification_split(seed=0, split="train", count=8, image_size=32)
    val, _ = render_classification_split(seed=0, split="val", count=8, image_size=32)
    longer, _ = render_classification_split(seed=0, split="train", count=12, image_size=32)
    assert not np.array_equal(train, val)
    assert np.array_equal(train, longer[:8])


def test_at_least_six_balanced_classes_rgb_32px() -> None:
    images, labels = render_classification_split(seed=0, split="train", count=800, image_size=32)
    assert images.shape == (800, 32, 32, 3) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert len(SHAPE_CLASSES) >= 6 and counts.min() > 800 / len(SHAPE_CLASSES) / 2


def test_scene_masks_are_disjoint_and_cover_visible_shapes() -> None:
    scene = render_scene(scene_rng(0, "train", 3), 64, num_shapes=3)
    stacked = np.stack(scene.masks).astype(int)
    assert stacked.sum(0).max() <= 1
    assert all(m.sum() > 0 for m in scene.masks[-1:])  # the top shape is never hidden


def test_classification_builder_caches_under_root(tmp_path) -> None:
    splits = DATASETS.build("shapes", task="classification", seed=0, root=str(tmp_path), train_size=20, val_size=10)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < len(SHAPE_CLASSES)
    cached = sorted((tmp_path / "shapes").glob("classification-*.npz"))
    assert len(cached) == 2
    stamp = [p.stat().st_mtime_ns for p in cached]
    again = DATASETS.build("shapes", task="classification", seed=0, root=str(tmp_path), train_size=20, val_size=10)
    assert [p.stat().st_mtime_ns for p in cached] == stamp
    assert torch.equal(again.train[0][0], image)


def test_segmentation_set_is_coco_format_and_read_through_the_coco_loader(tmp_path) -> None:
    splits = DATASETS.build("shapes", task="segmentation", seed=0, root=str(tmp_path), train_size=6, val_size=4)
    folders = list((tmp_path / "shapes").glob("segmentation-*"))
    assert len(folders) == 1
    annotations = json.loads((folders[0] / "annotations" / "instances_val.json").read_text())
    assert {c["name"] for c in annotations["categories"]} == set(SHAPE_CLASSES)
    assert all(isinstance(a["segmentation"]["counts"], str) for a in annotations["annotations"])  # RLE
    assert len(list((folders[0] / "val").glob("*.png"))) == 4
    assert splits.num_classes == len(SHAPE_CLASSES) + 1
    image, mask = splits.val[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    assert 0 < (mask > 0).float().mean() < 1
    assert set(mask.unique().tolist()) <= set(range(len(SHAPE_CLASSES) + 1))


def test_class_subset_and_elastic_change_the_data(tmp_path) -> None:
    subset = DATASETS.build(
        "shapes",
        task="classification",
        seed=0,
        root=str(tmp_path),
        train_size=40,
        val_size=8,
        classes=["star", "circle"],
    )
    assert subset.num_classes == 2 and subset.class_names == ["circle", "star"]
    assert {int(subset.train[i][1]) for i in range(40)} == {0, 1}
    rigid, _ = render_classification_split(seed=0, split="train", count=4, image_size=32, elastic=0.0)
    warped, _ = render_classification_split(seed=0, split="train", count=4, image_size=32, elastic=0.05)
    assert not np.array_equal(rigid, warped)


def test_bad_shape_options_are_config_errors(tmp_path) -> None:
    import pytest

    from dcn_experiments.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset.classes"):
        DATASETS.build("shapes", task="classification", seed=0, root=str(tmp_path), classes=["circle", "blob"])
    with pytest.raises(ConfigError, match="dataset.elastic"):
        DATASETS.build("shapes", task="classification", seed=0, root=str(tmp_path), elastic=-1.0)
