"""dcn-eval: perturbations (identity, rot90, translation, scale, image/mask alignment), the clean value
reproducing the run's own validation metric, robustness.json, plots, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dcn_experiments.data.perturb import AXES, perturb
from dcn_experiments.engine import Trainer, TrainerSettings
from dcn_experiments.engine.evaluate import evaluate
from dcn_experiments.eval import arm_labels, evaluate_robustness, main, plot_arms
from dcn_experiments.tasks import TASKS

from .conftest import assert_one_line_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_AXES = {
    "rotation": ("degrees", 0.0, 90.0),
    "scale": ("factor", 0.5, 1.5),
    "translation": ("fraction of size", 0.0, 0.25),
}


def _train(run_dir: Path, data_root: Path, *overrides: str) -> Path:
    env = {**os.environ, "DCN_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dcn_experiments.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory, shared_data_root: Path) -> Path:
    """A finished smoke run (ResNet-34, regular conv; its val is 2 of 4 batches of 16 images)."""
    return _train(tmp_path_factory.mktemp("cls") / "run", shared_data_root, "experiment=smoke")


@pytest.fixture
def segmentation_run(smoke_seg_run) -> Path:
    """A finished smoke run of the U-Net with deformable convolutions (shared with test_cli)."""
    return smoke_seg_run[0]


def _copy_run(run_dir: Path, destination: Path) -> Path:
    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("robustness.*"))
    return destination


# --- perturbations ------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", list(AXES))
def test_identity_strength_returns_the_input_unchanged(axis: str) -> None:
    images, masks = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))
    copies = images.clone(), masks.clone()
    out_images, out_masks = perturb(images, masks, axis, AXES[axis].identity, 255, fill=-2.0)
    assert out_images is images and out_masks is masks
    assert torch.equal(images, copies[0]) and torch.equal(masks, copies[1])


def test_rotation_by_90_degrees_equals_rot90_counter_clockwise() -> None:
    images, masks = torch.rand(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    rotated, rotated_masks = perturb(images, masks, "rotation", 90.0, 255, fill=-2.0)
    assert torch.equal(rotated, torch.rot90(images, 1, dims=(-2, -1)))
    assert torch.equal(rotated_masks, torch.rot90(masks, 1, dims=(-2, -1)))
    assert rotated_masks.dtype == masks.dtype


def test_translation_by_a_quarter_moves_a_pixel_by_a_quarter_of_the_size() -> None:
    images = torch.zeros(1, 3, 32, 32)
    images[0, :, 5, 7] = 1.0
    masks = torch.zeros(1, 32, 32, dtype=torch.long)
    masks[0, 5, 7] = 3
    moved, moved_masks = perturb(images, masks, "translation", 0.25, 255, fill=-2.0)
    # the content moves 8 px right and 8 px down; the top 8 rows and left 8 columns come from outside
    assert torch.equal(moved[0, :, 13, 15], torch.ones(3))
    assert moved_masks[0, 13, 15] == 3
    assert (moved[0, :, :8, :] == -2.0).all() and (moved[0, :, :, :8] == -2.0).all()
    assert (moved_masks[0, :8, :] == 255).all() and (moved_masks[0, :, :8] == 255).all()
    inside = moved[0, :, 8:, 8:].clone()
    inside[:, 5, 7] = 0.0
    assert (inside == 0.0).all()
    assert int((moved_masks[0, 8:, 8:] == 3).sum()) == 1


def test_scale_half_shrinks_about_the_centre() -> None:
    size = 8
    ramp = torch.arange(size, dtype=torch.float32).expand(size, size)  # value = column index
    images = ramp.expand(1, 3, size, size).clone()
    masks = torch.ones(1, size, size, dtype=torch.long)
    shrunk, shrunk_masks = perturb(images, masks, "scale", 0.5, 255, fill=-1.0)
    # the centre 3.5 stays put and distances from it halve: output column c shows input column 2c - 3.5
    columns = torch.arange(2, 6, dtype=torch.float32)
    torch.testing.assert_close(shrunk[0, :, 2:6, 2:6], (2 * columns - 3.5).expand(3, 4, 4), rtol=0, atol=1e-5)
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert (shrunk[0, :, outside] == -1.0).all()
    assert (shrunk_masks[0, 2:6, 2:6] == 1).all() and (shrunk_masks[0, outside] == 255).all()


@pytest.mark.parametrize(
    ("axis", "strength"),
    [("rotation", 22.5), ("rotation", 45.0), ("scale", 0.75), ("scale", 1.5), ("translation", 0.1875)],
)
def test_masks_stay_aligned_with_images(axis: str, strength: float) -> None:
    """The image is the one-hot encoding of its mask (3 classes, fill 0). Bilinear gives a pixel
    more than 0.75 of one class only when the nearest source pixel (what the mask samples) has that
    class, so such pixels must carry that class in the mask; a pixel with nothing of any class comes
    from outside and must be ignored; every labelled mask pixel must show its class in the image."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 3, (2, 1, 6, 6), generator=generator).float()
    masks = F.interpolate(blocks, size=(36, 36), mode="nearest").squeeze(1).long()
    images = F.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    out_images, out_masks = perturb(images, masks, axis, strength, 255, fill=0.0)
    assert not torch.equal(out_masks, masks)  # it really moved
    peak, cls = out_images.max(dim=1)
    confident = peak > 0.75
    labelled = out_masks != 255
    assert confident.sum() > 0.7 * labelled.sum()  # most labelled pixels are checked exactly
    assert torch.equal(out_masks[confident], cls[confident])
    empty = out_images.sum(dim=1) == 0
    assert (out_masks[empty] == 255).all()
    shown = out_images.gather(1, out_masks.clamp(max=2).unsqueeze(1)).squeeze(1)
    assert (shown[labelled] > 0).all()
    if axis != "scale" or strength < 1:
        assert empty.any()  # pixels from outside the frame exist and are ignored


@pytest.mark.parametrize(("task_name", "amp"), [("classification", False), ("segmentation", True)])
def test_evaluate_gives_the_trainers_validation_numbers(task_name: str, amp: bool) -> None:
    torch.manual_seed(0)
    segmentation = task_name == "segmentation"
    model = (
        torch.nn.Conv2d(3, 3, 3, padding=1)
        if segmentation
        else torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
        )
    )
    targets = torch.randint(0, 3, (20, 8, 8)) if segmentation else torch.randint(0, 3, (20,))
    if segmentation:
        targets[:, 0] = 255
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 8, 8), targets), batch_size=6)
    task = TASKS.build(task_name, num_classes=3, ignore_index=255, class_names=["a", "b", "c"])
    settings = TrainerSettings(epochs=1, limit_val_batches=0.75, precision="bf16" if amp else "32", progress=False)
    trainer = Trainer(model, task, None, None, torch.device("cpu"), settings, None, Path("unused"), {})
    summary, details = trainer.validate(loader, epoch=1)
    result = evaluate(model, task, loader, torch.device("cpu"), 0.75, amp_dtype=torch.bfloat16 if amp else None)
    key = task.metric_key
    assert result["loss"] == summary["val_loss"] and result[key] == summary[f"val_{key}"]
    assert result["details"] == details
    assert result["images"] == 18  # 3 of 4 batches of 6


# --- evaluation of a real run -------------------------------------------------------------------


def _check_schema(robustness: dict, metric: str) -> None:
    assert robustness["schema_version"] == 1
    assert robustness["metric"] == metric
    assert set(robustness["axes"]) == set(EXPECTED_AXES) == set(robustness["auc"])
    for axis, (unit, low, high) in EXPECTED_AXES.items():
        curve = robustness["axes"][axis]
        strengths, values = curve["strengths"], curve["values"]
        assert curve["unit"] == unit
        assert len(strengths) == len(values) == 5
        assert strengths == sorted(strengths) and strengths[0] == low and strengths[-1] == high
        assert all(isinstance(v, float) for v in values)
        trapezoid = getattr(np, "trapezoid", None) or np.trapz
        expected_mean = trapezoid(values, strengths) / (high - low)
        assert robustness["auc"][axis] == pytest.approx(expected_mean, abs=1e-12)
    assert 1.0 in robustness["axes"]["scale"]["strengths"]


@pytest.mark.parametrize(("fixture", "metric"), [("classification_run", "val_acc"), ("segmentation_run", "val_miou")])
def test_clean_value_reproduces_the_runs_validation_exactly(
    request: pytest.FixtureRequest, fixture: str, metric: str, tmp_path: Path
) -> None:
    run_dir = _copy_run(request.getfixturevalue(fixture), tmp_path / "run")
    record = json.loads((run_dir / "metrics.json").read_text())
    robustness = evaluate_robustness(run_dir)
    assert robustness["clean"] == record[metric]
    assert robustness["images"] == 2 * 16  # trainer.limit_val_batches=2 of batch 16 applies
    identities = {"rotation": 0, "scale": 2, "translation": 0}
    for axis, index in identities.items():
        assert robustness["axes"][axis]["values"][index] == record[metric]
        assert robustness["axes"][axis]["losses"][index] == record["val_loss"]
    _check_schema(robustness, metric)
    on_disk = json.loads((run_dir / "robustness.json").read_text())
    assert on_disk["clean"] == record[metric] and on_disk["axes"] == robustness["axes"]
    assert (run_dir / "robustness.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_writes_per_run_files_and_a_combined_plot(classification_run: Path, tmp_path: Path) -> None:
    runs = [_copy_run(classification_run, tmp_path / "sweep" / name) for name in ("0", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dcn_experiments.eval", *map(str, runs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((runs[0] / "metrics.json").read_text())
    for run in runs:
        robustness = json.loads((run / "robustness.json").read_text())
        assert robustness["clean"] == record["val_acc"]
        assert (run / "robustness.png").read_bytes().startswith(PNG_MAGIC)
        assert f"{run}: val_acc clean {record['val_acc']:.4f}" in result.stdout
    assert (tmp_path / "sweep" / "robustness.png").read_bytes().startswith(PNG_MAGIC)


def test_combined_plot_groups_seeds_into_arms(tmp_path: Path) -> None:
    def fake(conv: str, seed: int, level: float) -> dict:
        axes = {
            axis: {"unit": spec.unit, "strengths": list(spec.strengths), "values": [level] * 5}
            for axis, spec in AXES.items()
        }
        return {"metric": "val_acc", "clean": level, "axes": axes, "run": {"conv": conv, "seed": seed}}

    runs = [fake("regular", 0, 0.5), fake("regular", 1, 0.6), fake("deformable", 0, 0.7), fake("deformable", 1, 0.8)]
    assert arm_labels(runs) == ["regular", "regular", "deformable", "deformable"]
    plot_arms(runs, tmp_path / "combined.png")
    assert (tmp_path / "combined.png").read_bytes().startswith(PNG_MAGIC)


# --- errors: one line, exit 2 -------------------------------------------------------------------


def _main_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_run_dir_is_a_one_line_error_from_the_cli(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "-m", "dcn_experiments.eval", str(missing)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert_one_line_error(result, str(missing), "run folder not found")


def test_run_without_checkpoint(classification_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(classification_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")
    line = _main_error([str(run_dir)], capsys)
    assert "no checkpoint" in line and str(run_dir / "checkpoints" / "last.pt") in line


def test_truncated_checkpoint(classification_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(classification_run, tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    line = _main_error([str(run_dir)], capsys)
    assert str(checkpoint) in line and "not a readable dcn-train checkpoint" in line
    assert not (run_dir / "robustness.json").exists()


@pytest.mark.parametrize("payload", ["state_dict_only", "arbitrary_object"])
def test_foreign_checkpoint(
    classification_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, payload: str
) -> None:
    run_dir = _copy_run(classification_run, tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if payload == "state_dict_only":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
        expected = "not a dcn-train checkpoint"
    else:
        torch.save({"model": {}, "config": {}, "callback": shutil.copy}, checkpoint)  # not loadable safely
        expected = "not a readable dcn-train checkpoint"
    line = _main_error([str(run_dir)], capsys)
    assert str(checkpoint) in line and expected in line


def test_weights_of_another_model(classification_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(classification_run, tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["model"] = {"conv.weight": torch.zeros(1)}
    torch.save(payload, checkpoint)
    line = _main_error([str(run_dir)], capsys)
    assert "weights do not fit the model" in line


def test_failed_run(classification_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(classification_run, tmp_path / "run")
    record = json.loads((run_dir / "metrics.json").read_text())
    record.update(status="failed", reason="RuntimeError: boom")
    (run_dir / "metrics.json").write_text(json.dumps(record))
    line = _main_error([str(run_dir)], capsys)
    assert "failed run" in line and "boom" in line
