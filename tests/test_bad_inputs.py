"""Every bad input gets one ``error:`` line on stderr naming it and the fix, exit code 2, no traceback.

The command-line checks (unknown option or key, wrong type, unwritable output folder) run in
``dcn_experiments.cli.check_overrides``: tested in-process here, and through the real CLI once
``train.py`` calls it before Hydra (those CLI tests are xfail until then). Value ranges, data and
model-size errors go through the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dcn_experiments.cli import _NULLABLE_NUMBERS, check_overrides, one_line
from dcn_experiments.data import DATASETS
from dcn_experiments.errors import ConfigError, UserError

from .conftest import FAST, assert_one_line_error
from .test_cifar_imagefolder import write_fake_cifar10
from .test_coco import write_tiny_coco

SEG_FAST = (*FAST, "model=unet", "dataset=coco", "dataset.image_size=16", "dataset.num_workers=0")


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """One ``error:`` line with each fragment, no traceback, exit code 2."""
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2, result.stderr


def override_error(*argv: str) -> str:
    """The one line ``check_overrides`` raises for ``argv``."""
    with pytest.raises(UserError) as caught:
        check_overrides(list(argv))
    line = one_line(caught.value)
    assert "\n" not in str(caught.value), str(caught.value)
    return line


def write_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    """``root/<split>/<class>/<i>.png``: two classes, three 8x8 images each."""
    for split in splits:
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((8, 8, 3), 60 * label + 10 * i, np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def write_coco_layout(root: Path) -> Path:
    """The official COCO layout (train2017/, val2017/, annotations/instances_<split>.json) from the tiny set."""
    write_tiny_coco(root / "src")
    (root / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        shutil.copytree(root / "src" / "images", root / split)
        shutil.copy(root / "src" / "instances.json", root / "annotations" / f"instances_{split}.json")
    shutil.rmtree(root / "src")
    return root


# -- 1. unknown group option or key, unparsable overrides ------------------------------------------


def test_unknown_group_option_lists_the_options() -> None:
    line = override_error("model=resnet99")
    assert line.startswith("model=resnet99: ") and "choose one of: resnet34, unet" in line


def test_unknown_group_option_cli(run_cli, tmp_path: Path) -> None:
    result = run_cli("model=resnet99", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "model=resnet99", "Could not find 'model/resnet99'", "resnet34, unet")


def test_unknown_key_suggests_the_closest() -> None:
    line = override_error("trainer.lrr=0.1")
    assert line.startswith("trainer.lrr=0.1: no key 'trainer.lrr'") and "did you mean trainer.lr?" in line
    assert "keys of trainer: epochs, limit_train_batches" in line


def test_unknown_key_cli(run_cli, tmp_path: Path) -> None:
    result = run_cli("experiment=smoke", "trainer.lrr=0.1", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "trainer.lrr=0.1", "did you mean trainer.lr?")


def test_unknown_top_level_key() -> None:
    assert "did you mean trainer?" in override_error("trainr.lr=0.1")


def test_key_missing_for_one_value_of_a_sweep() -> None:
    line = override_error("-m", "dataset=shapes,cifar10", "dataset.train_size=10")
    assert "no key 'dataset.train_size' in the config with dataset=cifar10" in line


def test_unknown_option_in_a_sweep() -> None:
    assert override_error("-m", "model=resnet34,resnet99").startswith("model=resnet99: ")


def test_sweep_without_multirun() -> None:
    assert "add -m (--multirun)" in override_error("conv=regular,deformable")


def test_unparsable_override() -> None:
    assert override_error("trainer.lr=((").startswith("cannot parse the override 'trainer.lr=(('")


@pytest.mark.parametrize(
    "argv",
    [
        ("-m", "conv=regular,deformable", "experiment=smoke"),
        ("--multirun", "model=glob(*)", "hydra/launcher=basic", "trainer.lr=interval(0.001,0.1)"),
        ("--help",),
        ("--cfg", "job", "experiment=smoke"),
        ("+foo=1", "hydra.job.chdir=false"),
        ("experiment=smoke", "dataset=cifar10"),  # composes; the dataset builder names the stray keys
    ],
)
def test_valid_command_lines_pass(argv: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_overrides(list(argv))
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # checks create nothing


# -- 2. wrong type or out-of-range values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epochs=abc", "trainer.epochs=abc is not an integer; give trainer.epochs=VALUE like the default 4"),
        ("dataset.batch_size=abc", "dataset.batch_size=abc is not an integer"),
        ("trainer.lr=abc", "trainer.lr=abc is not a number"),
        ("trainer.channels_last=yes", "trainer.channels_last=yes is not true or false"),
        ("trainer.limit_val_batches=abc", "trainer.limit_val_batches=abc is not a number or null"),
        ("seed=1.5", "seed=1.5 is not an integer"),
    ],
)
def test_wrong_type(override: str, expected: str) -> None:
    assert override_error(override).startswith(expected)


def test_wrong_type_in_a_sweep() -> None:
    assert override_error("-m", "trainer.epochs=choice(1,abc)").startswith("trainer.epochs=abc is not an integer")


def test_nullable_number_keys_exist(compose_cfg) -> None:
    cfg = compose_cfg()
    for key in _NULLABLE_NUMBERS:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key


def test_wrong_type_cli(run_cli, tmp_path: Path) -> None:
    result = run_cli("experiment=smoke", "trainer.epochs=abc", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "trainer.epochs=abc is not an integer")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
        ("trainer.epochs=-1", "trainer.epochs=-1 must be >= 1"),
        ("dataset.batch_size=0", "dataset.batch_size=0 must be >= 1"),
        ("trainer.lr=-1", "trainer.lr=-1 must be a positive number"),
        ("trainer.lr=0", "trainer.lr=0 must be a positive number"),
        ("trainer.lr=nan", "trainer.lr=nan must be a positive number"),
        ("dataset.num_workers=-1", "dataset.num_workers=-1 must be >= 0"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1 must be a positive batch count"),
        ("dataset.image_size=-1", "dataset.image_size=-1 must be a positive number of pixels"),
    ],
)
def test_out_of_range_value(run_cli, tmp_path: Path, override: str, expected: str) -> None:
    result = run_cli("experiment=smoke", override, f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, expected)


def test_image_too_small_for_the_unet(run_cli, tmp_path: Path) -> None:
    result = run_cli("experiment=smoke_seg", "dataset.image_size=8", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "model=unet with model.depth=4 needs images of at least 16x16 px, got 8x8")


@pytest.mark.parametrize("dataset", ["shapes", "imagefolder", "coco"])
def test_image_size_zero_is_rejected_by_every_builder(dataset: str, tmp_path: Path) -> None:
    task = "segmentation" if dataset == "coco" else "classification"
    with pytest.raises(ConfigError, match=r"dataset.image_size=0 must be a positive number of pixels"):
        DATASETS.build(dataset, task=task, seed=0, root=str(tmp_path), image_size=0)


# -- 3./4. CIFAR-10: wrong layout, checksums -------------------------------------------------------------


def test_cifar10_root_pointing_inside_the_batches_folder(run_cli, tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path / "cifar")
    result = run_cli(*FAST, "dataset=cifar10", f"dataset.root={folder}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "dataset.root points at cifar-10-batches-py itself", f"use its parent {folder.parent}")


def test_cifar10_hand_made_set_fails_the_md5_check(run_cli, tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path / "cifar")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"precious": true}')
    result = run_cli(*FAST, "dataset=cifar10", f"dataset.root={tmp_path / 'cifar'}", f"hydra.run.dir={run_dir}")
    one_error_line(
        result, f"{folder / 'data_batch_1'} fails the official md5 check", "re-download, or dataset.verify=false"
    )
    assert json.loads((run_dir / "metrics.json").read_text()) == {"precious": True}


# dataset.verify=false (a warning in train.log, a caveat in metrics.json): one end-to-end run checks both,
# test_cli.test_cifar10_from_official_batches_end_to_end.


# -- 3./5. image folders: wrong layout, corrupt image ---------------------------------------------------


def test_imagefolder_images_not_in_class_folders(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_image_folder(root)
    for image in (root / "train" / "cat").iterdir():
        image.rename(root / "train" / image.name)
    result = run_cli(*FAST, "dataset=imagefolder", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"{root / 'train'} holds images directly (0.png, ...)", "one sub-folder per class")


def test_imagefolder_class_folders_without_train(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_image_folder(root, splits=("train",))
    for folder in (root / "train").iterdir():
        folder.rename(root / folder.name)
    (root / "train").rmdir()
    result = run_cli(*FAST, "dataset=imagefolder", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"{root} has no train/ folder (found cat, dog/)", "dataset.val_split")


def test_imagefolder_corrupt_image_in_a_worker(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_image_folder(root)
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(b"not a png at all")
    result = run_cli(
        *FAST,
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.num_workers=1",
        "dataset.batch_size=8",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    one_error_line(result, f"cannot read image {bad}", "replace or delete the file")


# -- 3./5./6. COCO: layout, annotations, images ---------------------------------------------------------


def test_coco_images_in_the_wrong_folder(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    (root / "train2017").rename(root / "images")
    result = run_cli(*SEG_FAST, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"COCO image folder not found: {root / 'train2017'}")


def test_coco_without_annotations(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    shutil.rmtree(root / "annotations")
    result = run_cli(*SEG_FAST, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"COCO annotation file not found: {root / 'annotations' / 'instances_train2017.json'}")


def test_coco_truncated_annotation_json(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    annotation = root / "annotations" / "instances_val2017.json"
    annotation.write_text(annotation.read_text()[:100])
    result = run_cli(*SEG_FAST, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"COCO annotation file is not valid JSON: {annotation}")


def test_coco_annotation_names_a_missing_image(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    (root / "train2017" / "2.png").unlink()
    result = run_cli(*SEG_FAST, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"COCO image file missing: {root / 'train2017' / '2.png'} (image id 2")


def test_coco_train_and_val_categories_disagree(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    annotation = root / "annotations" / "instances_val2017.json"
    data = json.loads(annotation.read_text())
    data["categories"][0]["name"] = "truck"  # id 3 is "car" in train
    annotation.write_text(json.dumps(data))
    result = run_cli(*SEG_FAST, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, "categories differ between", str(annotation), "3: car, 3: truck")


def test_coco_image_that_is_not_an_image(run_cli, tmp_path: Path) -> None:
    root = write_coco_layout(tmp_path / "coco")
    bad = root / "train2017" / "3.png"
    bad.write_bytes(b"\x00garbage")
    result = run_cli(*SEG_FAST[:-1], "dataset.num_workers=1", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    one_error_line(result, f"cannot read COCO image {bad}")


# -- 7. an output folder that cannot be created ------------------------------------------------------------


def test_run_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    line = override_error("experiment=smoke", f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert line == (
        f"hydra.run.dir={tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a folder; "
        "choose another hydra.run.dir"
    )


def test_run_dir_where_nothing_can_be_created() -> None:
    line = override_error("hydra.run.dir=/proc/forbidden/run")
    assert line.startswith("hydra.run.dir=/proc/forbidden/run: cannot create folders in /proc")


def test_run_dir_below_a_file_cli(run_cli, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = run_cli("experiment=smoke", f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    one_error_line(result, "is a file, not a folder")
