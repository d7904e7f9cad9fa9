"""``scripts/bench_training.py``: the training-throughput benchmark with its zero-cost-op ceiling runs
end to end (tiny models) and its ceiling arm keeps the offset branches in training."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from .conftest import import_script, run_script


def test_bench_training_writes_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    tiny = ["--resnet-width", "8", "--resnet-batch", "2", "--unet-batch", "2", "--unet-size", "32"]
    result = run_script(
        "bench_training.py", "--rounds", "1", "--steps", "1", "--threads", "1", *tiny, "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["arm"]) for r in rows] == [
        (model, arm) for model in ("resnet34", "unet") for arm in ("regular", "deformable", "zero-cost op")
    ]
    assert all(r["step_ms"] > 0 and r["throughput_vs_regular"] > 0 for r in rows)
    # a share of the step (timings of one tiny step are noise: only its form is checked)
    assert all(r["op_share_of_deformable_step"] < 1 for r in rows if r["arm"] == "zero-cost op")
    assert "| unet | zero-cost op |" in result.stdout


def test_bench_training_rejects_an_unknown_model(tmp_path: Path) -> None:
    result = run_script("bench_training.py", "--models", "vgg", "--out", str(tmp_path / "x.json"), timeout=120)
    assert result.returncode == 2 and "--models takes resnet34 and/or unet" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_zero_cost_arm_trains_the_offset_branch_and_outputs_the_regular_convolution() -> None:
    build_arm = import_script("bench_training").build_arm
    from dcn_experiments.models.conv import DeformConv2d

    args = types.SimpleNamespace(unet_width=8, unet_batch=2, unet_size=32, channels_last=False)
    net, x, y = build_arm("unet", "zero-cost op", args)
    layers = [m for m in net.modules() if isinstance(m, DeformConv2d)]
    assert layers
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for layer in layers:
        assert layer.offset_conv.weight.grad is not None  # the branch is in the graph
        probe = torch.randn(2, layer.in_channels, 8, 8)
        expected = torch.nn.functional.conv2d(probe, layer.weight, layer.bias, layer.stride, layer.padding)
        torch.testing.assert_close(layer(probe), expected)
