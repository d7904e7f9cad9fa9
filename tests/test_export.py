"""dcn-export: ONNX with the standard DeformConv (nothing custom), onnxruntime parity with PyTorch for
tiny deformable models, dynamic batch, the one-line errors, and a dcn-train run exported end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dcn_experiments.export import (
    MAX_RELATIVE_DIFFERENCE,
    check_standard,
    differences,
    export_onnx,
    main,
    onnxruntime_session,
)
from dcn_experiments.models import CONVS, MODELS, DeformConv2d, deformable_layers

from .conftest import assert_one_line_error, cli

pytest.importorskip("onnxscript", reason="dcn-export needs the deploy extra (onnxscript)")
ort = pytest.importorskip("onnxruntime")


def _perturb_offsets(net: nn.Module, scale: float = 0.02) -> nn.Module:
    """Non-zero offset predictors, so that the samples fall between pixels (zero offsets = a plain conv)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, DeformConv2d):
                weight = module.offset_conv.weight
                weight.copy_(torch.randn(weight.shape, generator=gen) * scale)
    return net.eval()


class GroupedDeformable(nn.Module):
    """Weight groups 2, offset groups 2, stride 2, dilation 2, no bias: what the model factory never builds."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.deform = DeformConv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False, version=version,
                                   offset_groups=2)  # fmt: skip
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.deform(torch.relu(self.stem(x)))))


def _tiny(name: str, version: int = 2, offset_groups: int = 1) -> nn.Module:
    # A fixed init: for about 1 in 10 random inits of the all-deformable ResNet-34 (width 4, offsets
    # perturbed) PyTorch's own float32 output differs from float64 by 5e-4..1e-3 relative (the untrained
    # net amplifies rounding), so a 1e-4 parity check would fail on conditioning, not on the export.
    torch.manual_seed(0)
    if name == "grouped":
        return _perturb_offsets(GroupedDeformable(version), scale=0.2)
    conv = CONVS.build("deformable", placement="all", version=version, offset_groups=offset_groups)
    return _perturb_offsets(MODELS.build(name, num_classes=3, conv=conv, width=4))


def _export_and_compare(net: nn.Module, path: Path, dynamic_batch: bool, batches: tuple[int, ...]) -> dict:
    gen = torch.Generator().manual_seed(1)
    export_onnx(net, torch.randn(batches[0], 3, 16, 16, generator=gen), path, opset=19, dynamic_batch=dynamic_batch)
    counts = check_standard(path)
    session = onnxruntime_session(path, threads=1)
    for batch in batches:
        x = torch.randn(batch, 3, 16, 16, generator=gen)
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        _, relative = differences(got, expected)
        assert relative < MAX_RELATIVE_DIFFERENCE, (batch, relative)
    return counts


@pytest.mark.parametrize(
    ("model", "version", "offset_groups", "dynamic_batch"),
    [
        pytest.param("resnet34", 2, 2, False, marks=pytest.mark.slow),  # 15-40 s on 2 loaded cores
        ("unet", 1, 1, True),
        ("grouped", 2, 2, True),
        ("grouped", 1, 2, False),
    ],
    ids=["resnet34-v2-og2", "unet-v1-dynamic", "groups2-v2-dynamic", "groups2-v1"],
)
def test_onnx_has_standard_deformconv_and_matches_pytorch(
    tmp_path: Path, model: str, version: int, offset_groups: int, dynamic_batch: bool
) -> None:
    net = _tiny(model, version, offset_groups)
    batches = (2, 1, 3) if dynamic_batch else (2,)
    counts = _export_and_compare(net, tmp_path / "model.onnx", dynamic_batch, batches)
    assert counts["DeformConv"] == sum(1 for _ in deformable_layers(net))


def test_deformconv_node_carries_the_geometry(tmp_path: Path) -> None:
    import onnx

    path = tmp_path / "grouped.onnx"
    export_onnx(_tiny("grouped", version=2), torch.randn(1, 3, 16, 16), path, opset=19, dynamic_batch=False)
    (node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DeformConv"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {
        "dilations": [2, 2],
        "group": 2,
        "kernel_shape": [3, 3],
        "offset_group": 2,
        "pads": [2, 2, 2, 2],
        "strides": [2, 2],
    }
    assert node.input[3] == "" and node.input[4] != ""  # no bias, a mask (v2)


def test_fixed_batch_file_rejects_another_batch(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    export_onnx(_tiny("grouped"), torch.randn(2, 3, 16, 16), path, opset=19, dynamic_batch=False)
    session = onnxruntime_session(path, threads=1)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 16, 16), np.float32)})


# --- the command: one tiny dcn-train run, exported; the error lines ------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shared_data_root: Path) -> Path:
    """A finished dcn-train run: deformable U-Net, one epoch of one batch, tiny images."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    overrides = [
        "experiment=smoke_seg",
        "conv=deformable",
        "model.width=4",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    ]
    result = cli(*overrides, cwd=run_dir.parent, data_root=shared_data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_dcn_export_exports_verifies_and_times_a_trained_run(trained_run: Path, shared_data_root: Path) -> None:
    result = cli(
        str(trained_run),
        "--dynamic-batch",
        "--images",
        "4",
        "--threads",
        "1",
        cwd=trained_run,
        data_root=shared_data_root,
        module="dcn_experiments.export",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {trained_run / 'model.onnx'} (unet deformable, opset 19, any batch size")
    assert "DeformConv nodes, standard operators only" in lines[0]
    deformable = int(lines[0].split(" DeformConv nodes")[0].rsplit(" ", 1)[1])
    assert "on 4 validation images: max abs diff" in lines[1]
    relative = float(lines[1].split("max rel diff ")[1].split()[0])
    assert relative <= MAX_RELATIVE_DIFFERENCE
    assert lines[2].startswith("latency per image (batch 4, 1 thread): PyTorch ") and "onnxruntime" in lines[2]
    assert check_standard(trained_run / "model.onnx")["DeformConv"] == deformable > 0
    assert not list(trained_run.glob(".*.tmp"))


def _main_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_opset_below_19_is_a_one_line_error(tmp_path: Path, shared_data_root: Path) -> None:
    result = cli(
        str(tmp_path), "--opset", "18", cwd=tmp_path, data_root=shared_data_root, module="dcn_experiments.export"
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--opset 18", "DeformConv from opset 19")


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _main_error([str(tmp_path / "nope")], capsys)
    assert str(tmp_path / "nope") in line and "not found" in line


def test_run_folder_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _main_error([str(tmp_path)], capsys)
    assert "no checkpoint" in line


@pytest.mark.parametrize("payload", ["state_dict_only", "not_torch"])
def test_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture, payload: str) -> None:
    checkpoint = tmp_path / "other.pt"
    if payload == "state_dict_only":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    else:
        checkpoint.write_text("not a checkpoint\n")
    line = _main_error([str(checkpoint)], capsys)
    assert str(checkpoint) in line and "dcn-train checkpoint" in line
    assert not (tmp_path / "other.onnx").exists()


@pytest.mark.slow  # trains the run fixture (~20 s)
def test_weights_of_another_model(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    payload = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    payload["model"] = {"conv.weight": torch.zeros(1)}
    checkpoint = tmp_path / "last.pt"
    torch.save(payload, checkpoint)
    line = _main_error([str(checkpoint)], capsys)
    assert "do not fit the model" in line


@pytest.mark.slow  # trains the run fixture (~20 s)
def test_a_file_onnxruntime_cannot_load_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_experiments import export

    def broken_export(model, example, path, opset, dynamic_batch) -> None:
        path.write_bytes(b"\x08\x07garbage that is no ONNX model")

    monkeypatch.setattr(export, "export_onnx", broken_export)
    monkeypatch.setattr(export, "check_standard", lambda path: {"DeformConv": 7})
    monkeypatch.setattr(export, "deformable_layers", lambda model: iter(range(7)))
    output = tmp_path / "model.onnx"
    output.write_bytes(b"an earlier export")
    line = _main_error([str(trained_run), "--output", str(output)], capsys)
    assert "onnxruntime" in line and "cannot load" in line
    assert output.read_bytes() == b"an earlier export"  # nothing already written is replaced
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # trains the run fixture (~20 s) and exports it
def test_parity_above_the_limit_fails_and_keeps_the_file_aside(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcn_experiments import export

    monkeypatch.setattr(export, "differences", lambda ours, reference: (0.5, 2e-4))
    output = tmp_path / "model.onnx"
    line = _main_error([str(trained_run), "--output", str(output), "--images", "2"], capsys)
    assert "differs from PyTorch by 2.00e-04 relative" in line and "> 0.0001" in line
    assert not output.exists()
    assert check_standard(tmp_path / "model.failed.onnx")["DeformConv"] > 0
