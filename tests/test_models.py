"""Model shapes, parameter counts, where deformable layers go, and step-0 equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcn_experiments import ops
from dcn_experiments.engine.optim import build_optimizer
from dcn_experiments.errors import ConfigError
from dcn_experiments.models import CONVS, MODELS, DeformConv2d, deformable_layers
from dcn_experiments.ops import deform_conv, triton_deform


def build(model: str, conv: str, num_classes: int = 10, **options):
    conv_options = {k: options.pop(k) for k in ("placement", "version", "cuda_kernel") if k in options}
    return MODELS.build(model, num_classes=num_classes, conv=CONVS.build(conv, **conv_options), **options)


def test_resnet34_output_shape_and_stems() -> None:
    x = torch.randn(2, 3, 32, 32)
    assert build("resnet34", "regular", width=8)(x).shape == (2, 10)
    assert build("resnet34", "regular", width=8, stem="imagenet")(x).shape == (2, 10)


def test_resnet34_imagenet_stem_matches_torchvision_parameter_count() -> None:
    torchvision = pytest.importorskip("torchvision")
    ours = build("resnet34", "regular", stem="imagenet")
    reference = torchvision.models.resnet34(num_classes=10)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_unet_output_shape_including_odd_sizes() -> None:
    model = build("unet", "regular", num_classes=5, width=4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5, 64, 64)
    assert model(torch.randn(1, 3, 50, 38)).shape == (1, 5, 50, 38)


@pytest.mark.parametrize(
    ("model", "placement", "expected"),
    [("resnet34", "stages", 26), ("resnet34", "all", 32), ("unet", "stages", 10), ("unet", "all", 18)],
)
def test_deformable_placement_counts(model: str, placement: str, expected: int) -> None:
    net = build(model, "deformable", width=4, placement=placement)
    assert len(list(deformable_layers(net))) == expected


def test_only_3x3_convolutions_change() -> None:
    regular = build("resnet34", "regular", width=8)
    deformable = build("resnet34", "deformable", width=8, placement="all")
    kinds_regular = [(n, type(m).__name__) for n, m in regular.named_modules() if "offset_conv" not in n]
    kinds_deformable = [(n, type(m).__name__) for n, m in deformable.named_modules() if "offset_conv" not in n]
    changed = [(a, b) for a, b in zip(kinds_regular, kinds_deformable, strict=True) if a != b]
    assert changed and all(a[1] == "Conv2d" and b[1] == "DeformConv2d" for a, b in changed)
    for name, layer in deformable_layers(deformable):
        assert layer.kernel_size == (3, 3), name
    assert isinstance(deformable.stem[0], nn.Conv2d)
    shortcuts = [m for n, m in deformable.named_modules() if n.endswith("shortcut") and isinstance(m, nn.Sequential)]
    assert len(shortcuts) == 3 and all(isinstance(m[0], nn.Conv2d) for m in shortcuts)


@pytest.mark.parametrize("model", ["resnet34", "unet"])
@pytest.mark.parametrize("version", [1, 2])
def test_zero_initialised_deformable_equals_regular_at_step_0(model: str, version: int) -> None:
    torch.manual_seed(0)
    regular = build(model, "regular", num_classes=4, width=4)
    deformable = build(model, "deformable", num_classes=4, width=4, placement="all", version=version)
    missing, unexpected = deformable.load_state_dict(regular.state_dict(), strict=False)
    assert not unexpected and missing and all("offset_conv" in k for k in missing)
    x = torch.randn(3, 3, 32, 32)
    for mode in (True, False):
        regular.train(mode)
        deformable.train(mode)
        torch.testing.assert_close(deformable(x), regular(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["resnet34", "unet"])
def test_one_seed_gives_both_arms_the_same_initial_kernels(model: str) -> None:
    """The comparison is paired: with one seed, every regular weight reappears in the deformable arm."""
    torch.manual_seed(0)
    regular = build(model, "regular", num_classes=4, width=4).state_dict()
    torch.manual_seed(0)
    deformable = build(model, "deformable", num_classes=4, width=4, placement="all").state_dict()
    assert all(torch.equal(value, deformable[key]) for key, value in regular.items())


def test_deform_conv_module_v1_has_no_mask_and_v2_mask_is_one_at_init() -> None:
    x = torch.randn(2, 4, 8, 8)
    v1 = DeformConv2d(4, 6, 3, padding=1, version=1)
    offset, mask = v1.offsets_and_mask(x)
    assert offset.shape == (2, 18, 8, 8) and mask is None
    v2 = DeformConv2d(4, 6, 3, padding=1, version=2)
    offset, mask = v2.offsets_and_mask(x)
    assert torch.all(offset == 0) and torch.all(mask == 1)
    with pytest.raises(ConfigError):
        DeformConv2d(4, 6, 3, version=3)


def test_offset_statistics_are_recorded_in_training_only() -> None:
    layer = DeformConv2d(4, 4, 3, padding=1)
    nn.init.normal_(layer.offset_conv.weight, std=0.1)
    layer.eval()
    layer(torch.randn(1, 4, 6, 6))
    assert layer.pop_offset_stats() is None
    layer.train()
    layer(torch.randn(1, 4, 6, 6))
    mean, peak = layer.pop_offset_stats()
    assert 0 < mean <= peak
    assert layer.pop_offset_stats() is None


def test_offset_predictors_get_their_own_learning_rate() -> None:
    net = build("resnet34", "deformable", width=4)
    optimizer = build_optimizer(net, "adam", 1e-3, 0.0, 0.9, offset_lr_mult=0.1)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"main": 1e-3, "offsets": pytest.approx(1e-4)}
    grouped = sum(len(g["params"]) for g in optimizer.param_groups)
    assert grouped == len(list(net.parameters()))


def test_bad_model_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.stem"):
        build("resnet34", "regular", stem="tiny")
    with pytest.raises(ConfigError, match="conv.placement"):
        build("resnet34", "deformable", placement="everywhere")


@pytest.fixture
def restore_cuda_kernel():
    """The op's CUDA kernel is a process-wide setting: put the default back after the test."""
    yield
    ops.use_cuda_kernel("auto")


def test_conv_cuda_kernel_reaches_the_op(restore_cuda_kernel) -> None:
    net = build("resnet34", "deformable", width=4, cuda_kernel="torchvision")
    assert ops.cuda_kernel() == "torchvision"
    assert {layer.cuda_kernel for _, layer in deformable_layers(net)} == {"torchvision"}
    build("resnet34", "regular", width=4, cuda_kernel="triton")  # ignored for the regular arm
    assert ops.cuda_kernel() == "torchvision"
    build("resnet34", "deformable", width=4)
    assert ops.cuda_kernel() == "auto"  # the default


def test_bad_cuda_kernel_is_a_config_error(restore_cuda_kernel, monkeypatch, caplog) -> None:
    with pytest.raises(ConfigError, match="conv.cuda_kernel='cudnn' is not valid; choose one of auto, torchvision"):
        build("resnet34", "deformable", width=4, cuda_kernel="cudnn")
    with pytest.raises(ConfigError, match="conv.cuda_kernel='cudnn'"):
        build("resnet34", "regular", width=4, cuda_kernel="cudnn")  # a typo is an error in both arms
    without = {name: kernel for name, kernel in deform_conv._CUDA_KERNELS.items() if name != "triton"}
    monkeypatch.setattr(deform_conv, "_CUDA_KERNELS", without)
    monkeypatch.setattr(deform_conv, "_triton_warned", [])  # the warning is logged once per process
    monkeypatch.setattr(triton_deform, "triton", None)
    monkeypatch.setattr(triton_deform, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(ConfigError, match="conv.cuda_kernel=triton: the Triton kernel needs triton"):
        build("resnet34", "deformable", width=4, cuda_kernel="triton")
    assert ops.cuda_kernel() != "triton"
    # auto without Triton: bf16 goes to torchvision (in float32), and the log says so
    build("resnet34", "deformable", width=4, cuda_kernel="auto")
    x = torch.zeros(1, 4, 3, 3, dtype=torch.bfloat16)
    assert deform_conv._kernel_for(x, [x]) == ("torchvision", torch.float32)
    assert "Triton is not available" in caplog.text and "float32" in caplog.text
