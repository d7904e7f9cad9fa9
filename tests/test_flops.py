"""Forward FLOPs (MACs) per image: every expected value below is counted by hand from the layer shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcn_experiments.models import CONVS, MODELS, DeformConv2d
from dcn_experiments.models.flops import FLOP_CATEGORIES, flops_breakdown, flops_per_image


def build(model: str, conv: str, num_classes: int = 10, **options) -> nn.Module:
    return MODELS.build(model, num_classes=num_classes, conv=CONVS.build(conv), **options)


def test_deformable_v2_strided_grouped_layer_matches_hand_count() -> None:
    layer = DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True, version=2, offset_groups=2)
    # Input 4x9x7 -> output 5x4 (= 20 positions), k = 9 taps.
    offset_branch = 20 * (2 * 9 * 3) * (4 * 9) + 20 * 54  # 54 = offset_groups x k x 3 channels, + bias
    sampling = 20 * 9 * 4 * (4 + 1)  # positions x taps x Cin x (4 bilinear corners + mask)
    gemm = 20 * 6 * (4 // 2) * 9 + 20 * 6  # positions x Cout x Cin/groups x k, + bias
    counts = flops_breakdown(layer, (4, 9, 7))
    assert counts["deform_offset_branch"] == offset_branch == 39960
    assert counts["deform_sampling"] == sampling == 3600
    assert counts["deform_gemm"] == gemm == 2280
    assert counts["conv"] == 0  # the predictor is counted once, as the offset branch
    assert flops_per_image(layer, (4, 9, 7)) == 39960 + 3600 + 2280


def test_deformable_v1_layer_matches_hand_count() -> None:
    layer = DeformConv2d(4, 6, 3, stride=2, padding=1, bias=False, version=1)
    offset_branch = 20 * (2 * 9) * (4 * 9) + 20 * 18  # 2 x k offset channels, + bias
    sampling = 20 * 9 * 4 * 4  # no mask: 4 corner MACs per sampled value
    gemm = 20 * 6 * 4 * 9  # no bias
    assert flops_per_image(layer, (4, 9, 7)) == offset_branch + sampling + gemm == 13320 + 2880 + 4320


def test_conv2d_and_linear_match_hand_count() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)  # 3x8x8 -> 5x4x4 = 80 outputs
    assert flops_breakdown(conv, (3, 8, 8))["conv"] == 80 * 3 * 9 + 80 == 2240
    grouped = nn.Conv2d(4, 6, (3, 1), groups=2, bias=False)  # 4x5x5 -> 6x3x5 = 90 outputs
    assert flops_per_image(grouped, (4, 5, 5)) == 90 * 2 * 3 == 540
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    assert flops_breakdown(head, (3, 2, 2))["linear"] == 12 * 7 + 7


def extra_per_deformable_layer(in_channels: int, side: int) -> int:
    """Offset branch (3x3 conv to 27 channels + bias) and v2 sampling of one 3x3 stride-matched layer."""
    positions = side * side
    return positions * 27 * in_channels * 9 + positions * 27 + positions * 9 * in_channels * 5


def test_deformable_resnet34_costs_regular_plus_offset_branches_and_sampling() -> None:
    regular = flops_breakdown(build("resnet34", "regular", width=8), (3, 32, 32))
    deformable = flops_breakdown(build("resnet34", "deformable", width=8), (3, 32, 32))
    # Stages 2-4 (channels 16/32/64, 4/6/3 blocks, output 16/8/4 px) are deformable; each stage's
    # first conv takes half the channels, the other 2 x blocks - 1 convs take the full width.
    extra = sum(
        extra_per_deformable_layer(channels // 2, side) + (2 * blocks - 1) * extra_per_deformable_layer(channels, side)
        for channels, blocks, side in ((16, 4, 16), (32, 6, 8), (64, 3, 4))
    )
    assert sum(deformable.values()) - sum(regular.values()) == extra
    assert deformable["deform_offset_branch"] + deformable["deform_sampling"] == extra
    # The deformable GEMMs cost exactly what the convolutions they replace cost.
    assert deformable["conv"] + deformable["deform_gemm"] == regular["conv"]
    assert deformable["linear"] == regular["linear"] == 64 * 10 + 10


def test_resnet34_imagenet_stem_is_about_3_6_gflops() -> None:
    with torch.device("meta"):  # shapes only: counting needs no arithmetic
        model = build("resnet34", "regular", num_classes=1000, stem="imagenet")
    total = flops_per_image(model, (3, 224, 224))
    assert total == pytest.approx(3.6e9, rel=0.03)  # ResNet paper, Table 1
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = torchvision.models.resnet34()
    assert total == flops_per_image(reference, (3, 224, 224))


def test_unet_counts_transposed_convolutions() -> None:
    counts = flops_breakdown(build("unet", "regular", num_classes=5, width=4, depth=2), (3, 16, 16))
    # ConvTranspose(16->8, k2 s2, bias) on 16x4x4, then (8->4) on 8x8x8: in elements x Cout x 4, + bias.
    assert counts["conv_transpose"] == (256 * 8 * 4 + 8 * 8 * 8) + (512 * 4 * 4 + 4 * 16 * 16) == 17920
    double_convs = (
        256 * 4 * (3 + 4) * 9  # inc at 16x16: 3->4, 4->4
        + 64 * 8 * (4 + 8) * 9  # down 1 at 8x8: 4->8, 8->8
        + 16 * 16 * (8 + 16) * 9  # down 2 at 4x4: 8->16, 16->16
        + 64 * 8 * (16 + 8) * 9  # up 1 at 8x8: 16->8, 8->8
        + 256 * 4 * (8 + 4) * 9  # up 2 at 16x16: 8->4, 4->4
    )
    head = 256 * 5 * 4 + 256 * 5  # 1x1 conv with bias
    assert counts["conv"] == double_convs + head
    assert set(counts) == set(FLOP_CATEGORIES)


def small_deformable_net() -> nn.Module:
    return nn.Sequential(
        DeformConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )


def test_counting_leaves_model_modes_parameters_statistics_and_rng_untouched() -> None:
    model = small_deformable_net()
    model.train()
    model[2].eval()  # a mixed state must come back as it was, not as one flag
    modes = [module.training for module in model.modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops_per_image(model, (3, 6, 6))
    assert [module.training for module in model.modules()] == modes
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not module._forward_hooks for module in model.modules())
    assert not model[0]._offset_stats


def test_count_does_not_depend_on_dtype_or_device() -> None:
    model = small_deformable_net()
    expected = flops_per_image(model, (3, 6, 6))
    assert flops_per_image(model.double(), (3, 6, 6)) == expected
    assert next(model.parameters()).dtype == torch.float64
    with torch.device("meta"):
        assert flops_per_image(small_deformable_net(), (3, 6, 6)) == expected


@pytest.mark.parametrize("shape", [(3, 32), (3, 0, 32), (3.0, 32, 32)])
def test_bad_image_shape_is_rejected(shape: tuple) -> None:
    with pytest.raises(ValueError, match="image_shape"):
        flops_per_image(nn.Conv2d(3, 3, 1), shape)
