"""End to end through the real CLI in a subprocess: outputs, multirun report, and user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import FAST, ONE_STEP, SHARED_DATA, assert_one_line_error
from .test_cifar_imagefolder import write_fake_cifar10

EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "epoch_time_s", "train_throughput_img_s"}


def _tags(run_dir: Path) -> dict[str, list[str]]:
    tags: dict[str, set[str]] = {"scalars": set(), "tensors": set(), "images": set()}
    for events in (run_dir / "tb").glob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    return {k: sorted(v) for k, v in tags.items()}


def test_smoke_classification_writes_the_spec_outputs(smoke_run) -> None:
    run_dir, result = smoke_run  # experiment=smoke conv=deformable
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "task",
        "model",
        "conv",
        "dataset",
        "seed",
        "params",
        "epochs",
        "val_acc",
        "val_loss",
        "epoch_time_s",
        "train_throughput_img_s",
    ):
        assert key in metrics, key
    assert (metrics["task"], metrics["model"], metrics["conv"], metrics["dataset"]) == (
        "classification",
        "resnet34",
        "deformable",
        "shapes",
    )
    assert len(metrics["epochs"]) == 2 and EPOCH_KEYS | {"train_acc", "val_acc"} <= metrics["epochs"][-1].keys()
    assert metrics["params"] > 0 and metrics["epochs"][-1]["offset_abs_mean"] >= 0
    assert (metrics["schema_version"], metrics["status"]) == (2, "completed")
    assert metrics["deformable_backend"] == "cpp-cpu"  # the C++ kernel really ran, not the fallback
    breakdown = metrics["flops_breakdown"]
    assert metrics["flops_per_image"] == sum(breakdown.values()) and breakdown["deform_sampling"] > 0
    env = metrics["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["cpu"] and env["host"] and env["gpu"] is None and env["concurrent_jobs"] == 1
    tags = _tags(run_dir)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "time/epoch_s", "time/throughput_img_s"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("offsets/") and t.endswith("/abs_max") for t in tags["scalars"])
    assert tags["images"] == ["offsets/stages.3.2.conv2"]  # where the last deformable layer samples
    assert (run_dir / "offsets_stages.3.2.conv2.png").stat().st_size > 0
    assert any(t.startswith("config") for t in tags["tensors"])  # resolved config as text
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["conv"]["name"] == "deformable"
    assert {"model", "optimizer", "scheduler", "step", "best_metric"} <= checkpoint.keys()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert "Traceback" not in result.stderr


def test_smoke_segmentation_writes_miou(smoke_seg_run) -> None:
    run_dir, _ = smoke_seg_run  # experiment=smoke_seg conv=deformable
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["model"] == "unet"
    assert 0 <= metrics["val_miou"] <= 1 and "pixel_acc" in metrics
    assert set(metrics["per_class_iou"]) == {
        "background",
        "circle",
        "square",
        "triangle",
        "hexagon",
        "star",
        "cross",
        "ring",
        "crescent",
    }
    assert {"train_miou", "val_miou"} <= metrics["epochs"][-1].keys()
    tags = _tags(run_dir)
    assert {"train/miou", "val/miou", "val/loss"} <= set(tags["scalars"])
    assert any(t.startswith("per_class_iou") for t in tags["tensors"])


def test_multirun_writes_report_and_dcn_report_regenerates_it(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "conv=regular,deformable", "experiment=smoke", *ONE_STEP, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    report = (sweep / "report.md").read_text()
    assert "| resnet34 | regular |" in report and "| resnet34 | deformable |" in report
    regular = json.loads((sweep / "0_resnet34_regular" / "metrics.json").read_text())
    deformable = json.loads((sweep / "1_resnet34_deformable" / "metrics.json").read_text())
    assert regular["deformable_backend"] == "none" and regular["flops_breakdown"]["deform_offset_branch"] == 0
    extra = deformable["flops_breakdown"]["deform_offset_branch"] + deformable["flops_breakdown"]["deform_sampling"]
    assert deformable["flops_per_image"] == regular["flops_per_image"] + extra
    assert "## Deformable / regular" in report and "epoch time x" in report
    assert (sweep / "curves.png").is_file() and (sweep / "cost.png").is_file()
    (sweep / "report.md").unlink()
    regenerated = run_cli(str(sweep), module="dcn_experiments.report.cli")
    assert regenerated.returncode == 0, regenerated.stderr
    assert (sweep / "report.md").read_text() == report
    assert "| resnet34 | deformable |" in regenerated.stdout


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which("dcn-train", path=str(Path(sys.executable).parent)) or shutil.which("dcn-train")
    assert script, "dcn-train is not installed; pip install -e ."
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model: resnet34, unet" in result.stdout and "conv: deformable, regular" in result.stdout


def test_cli_entry_points_import_no_heavy_libraries(tmp_path: Path) -> None:
    """Every CLI start pays its imports: torchvision (which pulls torch._dynamo, ~1.4 s), scipy.stats
    (~0.5 s), matplotlib, tensorboard and the ONNX stack are imported only where a code path needs them."""
    heavy = ["torchvision", "scipy", "matplotlib", "tensorboard", "onnx", "onnxruntime", "onnxscript"]
    code = (
        "import sys\n"
        "import dcn_experiments.train, dcn_experiments.report.cli, dcn_experiments.export, dcn_experiments.eval\n"
        f"print(sorted(name for name in {heavy!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported at CLI start: {result.stdout.strip()}"


def test_cifar10_missing_offline(run_cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-cifar"
    result = run_cli(*FAST, "dataset=cifar10", f"dataset.root={missing}", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, str(missing / "cifar-10-batches-py"), "dataset.download=true")


def test_cifar10_from_official_batches_end_to_end(run_cli, tmp_path: Path) -> None:
    """Also the check that dataset.verify=false is a warning in train.log and a caveat in metrics.json."""
    folder = write_fake_cifar10(tmp_path / "cifar", per_batch=8)
    run_dir = tmp_path / "r"
    result = run_cli(
        *FAST,
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'cifar'}",
        "dataset.num_workers=0",
        "dataset.verify=false",  # hand-made batches cannot pass the official md5 check
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["dataset"] == "cifar10"
    assert any("md5 check skipped" in caveat for caveat in record["data_caveats"])  # recorded, not silent
    log = (run_dir / "train.log").read_text()
    assert f"CIFAR-10 md5 check skipped (dataset.verify=false): {folder} may not be the official set" in log
    assert "[WARNING]" in next(line for line in log.splitlines() if "md5 check skipped" in line)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_imagefolder_missing_or_empty_root(run_cli, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "images"
    if kind == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    result = run_cli(*FAST, "dataset=imagefolder", f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, str(root))


def test_task_and_dataset_mismatch(run_cli, tmp_path: Path) -> None:
    result = run_cli("model=unet", "dataset=cifar10", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, "model=unet does segmentation", "dataset=cifar10")


def test_coco_root_missing(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        *FAST, "model=unet", "dataset=coco", f"dataset.root={tmp_path / 'none'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert_one_line_error(result, "dataset.root does not exist")


def test_bad_trainer_value_is_one_line(run_cli, tmp_path: Path) -> None:
    result = run_cli("experiment=smoke", "trainer.optimizer=rmsprop", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, "trainer.optimizer='rmsprop'", "adam")


def test_experiment_keys_that_a_dataset_does_not_take(run_cli, tmp_path: Path) -> None:
    result = run_cli("experiment=smoke", "dataset=cifar10", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, "dataset=cifar10 does not take dataset.", "train_size", "accepted:")


def test_dcn_report_on_a_folder_without_runs(run_cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(str(tmp_path / "empty"), module="dcn_experiments.report.cli"), "no metrics.json")


def test_errors_do_not_overwrite_existing_outputs(run_cli, tmp_path: Path) -> None:
    """Without CUDA this is also the check of ``device=cuda``'s one-line error."""
    run_dir = tmp_path / "keep"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"precious": true}')
    cuda = torch.cuda.is_available()
    result = run_cli("experiment=smoke", "dataset=imagefolder" if cuda else "device=cuda", f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    if not cuda:
        assert_one_line_error(result, "device=cuda", "CUDA is not available")
        assert result.returncode == 2
    assert json.loads((run_dir / "metrics.json").read_text()) == {"precious": True}


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "coco-mini").is_dir(), reason="../shared/data/coco-mini absent")
def test_real_coco_mini_end_to_end(run_cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "coco"
    result = run_cli(
        *FAST,
        "model=unet",
        "dataset=coco",
        f"dataset.root={SHARED_DATA / 'coco-mini'}",
        "dataset.image_size=64",
        "dataset.categories=[person,car,dog]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"] == "coco" and set(metrics["per_class_iou"]) == {"background", "person", "car", "dog"}


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-subset").is_dir(), reason="../shared/data/cifar10-subset absent")
def test_real_cifar10_subset_end_to_end(run_cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "cifar"
    result = run_cli(
        *FAST,
        "dataset=imagefolder",
        f"dataset.root={SHARED_DATA / 'cifar10-subset'}",
        "dataset.val_split=test",
        "dataset.num_workers=0",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["params"] > 0
