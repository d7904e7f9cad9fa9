"""trainer.precision / channels_last / compile: the old amp keys answered in one line, bf16 on CPU for
both arms with the deformable layers' real compute dtype recorded, channels-last and compiled runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader, TensorDataset

from dcn_experiments.cli import check_overrides
from dcn_experiments.engine import Trainer, TrainerSettings
from dcn_experiments.engine.distributed import DistContext
from dcn_experiments.engine.precision import deformable_precision_note, resolve_precision
from dcn_experiments.engine.scale import prepare_model
from dcn_experiments.engine.tensorboard import NullLogger
from dcn_experiments.errors import ConfigError
from dcn_experiments.models.conv import DeformConv2d
from dcn_experiments.tasks import TASKS
from dcn_experiments.train import build_data, build_model, train

TINY = (
    "experiment=smoke",
    "trainer.epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "dataset.train_size=32",
    "dataset.val_size=16",
    "dataset.batch_size=8",
)


def _cfg(compose_cfg, *overrides: str):
    cfg = compose_cfg(*TINY, "device=cpu", *overrides)
    with open_dict(cfg):
        del cfg["hydra"]  # train() gets the job's config, as Hydra hands it over
    return cfg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.amp=true", "trainer.amp was replaced; use trainer.precision=32|bf16|16"),
        ("trainer.amp_dtype=float16", "trainer.amp_dtype was replaced; use trainer.precision=32|bf16|16"),
        ("+trainer.amp=true", "trainer.amp was replaced"),
    ],
)
def test_old_amp_keys_name_the_new_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_overrides([override])
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_precision_values() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision(32, cpu).autocast_dtype is None
    assert resolve_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    assert not resolve_precision("bf16", cpu).uses_scaler
    assert resolve_precision(16, torch.device("cuda")).uses_scaler  # GradScaler with float16 only
    with pytest.raises(ConfigError, match="trainer.precision=16 needs CUDA.*use trainer.precision=bf16"):
        resolve_precision(16, cpu)
    with pytest.raises(ConfigError, match="trainer.precision=fp8 is not valid; choose one of 32, bf16, 16"):
        resolve_precision("fp8", cpu)


def test_note_only_when_the_deformable_layers_ran_in_another_dtype() -> None:
    bf16 = resolve_precision("bf16", torch.device("cpu"))
    assert "computed in float32 (3 of 3 calls)" in deformable_precision_note(bf16, {"float32": 3})
    assert deformable_precision_note(bf16, {"bfloat16": 3}) is None
    assert deformable_precision_note(resolve_precision("32", torch.device("cpu")), {"float32": 3}) is None


@pytest.mark.parametrize("conv", ["regular", "deformable"])
def test_bf16_on_cpu_trains_both_arms_and_records_the_deformable_dtype(compose_cfg, tmp_path: Path, conv: str) -> None:
    cfg = _cfg(compose_cfg, f"conv={conv}", "trainer.precision=bf16")
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["precision"] == "bf16"
    if conv == "deformable":
        # on CPU the op computes bfloat16 inputs in float32 (no bf16 kernel): recorded and explained
        assert metrics["deformable_precision"] == "float32"
        assert "favour the regular arm" in metrics["deformable_precision_note"]
        assert "deformable layers computed in float32" in (tmp_path / "metrics.json").read_text()
    else:
        assert metrics["deformable_precision"] == "none" and metrics["deformable_precision_note"] is None


def test_channels_last_lays_out_the_model_and_trains_the_deformable_arm(compose_cfg, tmp_path: Path) -> None:
    cfg = _cfg(compose_cfg, "conv=deformable", "trainer.channels_last=true")
    _, data = build_data(cfg)
    model = build_model(cfg, data)
    train_net, eval_net = prepare_model(model, cfg.trainer, torch.device("cpu"), DistContext())
    assert train_net is model and eval_net is model
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["channels_last"] is True
    assert metrics["deformable_backend"] != "none"


def _tiny_deformable() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        DeformConv2d(4, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


@pytest.mark.slow
def test_compile_trains_a_deformable_model(tmp_path: Path) -> None:
    """torch.compile (graph breaks allowed) around the deformable op: same outputs, trains, plain checkpoints."""
    model = _tiny_deformable()
    images, labels = torch.randn(16, 3, 12, 12), torch.randint(0, 3, (16,))
    with torch.no_grad():
        model[1].offset_conv.weight.normal_(0, 0.1)  # non-zero offsets: really sample off the grid
        model.eval()
        eager = model(images)
    settings = OmegaConf.create({"channels_last": False, "sync_batchnorm": False, "compile": True})
    train_net, eval_net = prepare_model(model, settings, torch.device("cpu"), DistContext())
    assert isinstance(train_net, torch._dynamo.eval_frame.OptimizedModule) and eval_net is train_net
    with torch.no_grad():
        torch.testing.assert_close(eval_net(images), eager, atol=1e-5, rtol=1e-5)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    task = TASKS.build("classification", num_classes=3, ignore_index=255, class_names=["a", "b", "c"])
    trainer = Trainer(
        model,
        task,
        optimizer,
        schedule,
        torch.device("cpu"),
        TrainerSettings(epochs=1, progress=False),
        NullLogger(),
        tmp_path,
        {},
        train_net=train_net,
        eval_net=eval_net,
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    before = model[1].weight.detach().clone()
    result = trainer.fit(loader, loader)
    assert math.isfinite(result.epochs[0]["train_loss"]) and not torch.equal(before, model[1].weight)
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert set(state) == set(model.state_dict())  # no "_orig_mod." prefixes


def test_report_flags_time_ratios_when_the_deformable_layers_ran_in_float32(tmp_path: Path) -> None:
    from dcn_experiments.report import cli
    from tests.test_report import write_run

    for seed in (0, 1):
        write_run(tmp_path, f"{seed}_r", "regular", seed, 0.5)
        write_run(tmp_path, f"{seed}_d", "deformable", seed, 0.6)
        record = tmp_path / f"{seed}_d" / "metrics.json"
        data = json.loads(record.read_text())
        data.update(precision="bf16", deformable_precision="float32", deformable_precision_note="float32 under bf16")
        record.write_text(json.dumps(data))
    assert cli.main([str(tmp_path)]) == 0
    (group,) = json.loads((tmp_path / "report.json").read_text())["groups"]
    assert group["cost"]["deformable_precision_differs"]
    assert "computed in another dtype than the run's precision" in group["cost"]["verdict"]
    assert any("0_d, 1_d" in w and "favours regular" in w for w in group["warnings"])


def test_an_unknown_precision_is_one_line_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.precision=fp8 is not valid; choose one of 32 \| bf16 \| 16$"):
        check_overrides(["trainer.precision=fp8"])
    check_overrides(["trainer.precision=16"])  # valid here; on CPU train() refuses it (needs CUDA)


def test_float16_on_cpu_is_a_one_line_error(run_cli) -> None:
    from tests.conftest import assert_one_line_error

    result = run_cli(*TINY, "device=cpu", "trainer.precision=16", "hydra.run.dir=run")
    assert result.returncode == 2
    assert_one_line_error(result, "trainer.precision=16 needs CUDA", "use trainer.precision=bf16 or 32")
