"""Offset views: sampling points in image pixels, the drawing, the PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dcn_experiments.models import CONVS, MODELS, DeformConv2d, deformable_layers
from dcn_experiments.report.offsets import draw_offset_views, offset_view_image, sampling_points, write_offset_views

SIZE = 32


def _model(version: int = 2) -> nn.Module:
    torch.manual_seed(0)
    conv = CONVS.build("deformable", placement="stages", version=version)
    return MODELS.build("resnet34", num_classes=4, conv=conv, width=4).eval()


def _images(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _last_layer(model: nn.Module) -> tuple[str, DeformConv2d]:
    return list(deformable_layers(model))[-1]


def _input_shape(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    shapes = []
    handle = layer.register_forward_hook(lambda module, inputs, output: shapes.append(inputs[0].shape[-2:]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return tuple(shapes[0])


def _expected_grid(oy: int, ox: int, layer: DeformConv2d, stride: float) -> np.ndarray:
    """The 3x3 taps of output (oy, ox) in image pixels, written out tap by tap."""
    taps = []
    for i in range(3):
        for j in range(3):
            y = oy * layer.stride[0] - layer.padding[0] + i * layer.dilation[0]
            x = ox * layer.stride[1] - layer.padding[1] + j * layer.dilation[1]
            taps.append(((y + 0.5) * stride - 0.5, (x + 0.5) * stride - 0.5))
    return np.array(taps)


def _set_constant_offsets(layer: DeformConv2d, dy: float, dx: float) -> None:
    taps = 9 * layer.offset_groups
    with torch.no_grad():
        layer.offset_conv.weight.zero_()
        layer.offset_conv.bias.zero_()  # v2: mask logits 0 -> mask 1
        layer.offset_conv.bias[0 : 2 * taps : 2] = dy  # channels [dy0, dx0, dy1, dx1, ...]
        layer.offset_conv.bias[1 : 2 * taps : 2] = dx


@pytest.mark.parametrize("version", [1, 2])
def test_constant_offsets_shift_every_tap_by_offset_times_stride(version: int) -> None:
    model, images = _model(version), _images()
    name, layer = _last_layer(model)
    in_h, in_w = _input_shape(model, layer, images)
    stride = SIZE / in_h
    assert stride in (4.0, 8.0) and in_h == in_w
    _set_constant_offsets(layer, dy=1.0, dx=2.0)

    points = sampling_points(model, images)

    assert points["layer"] == name
    assert points["stride"] == (stride, stride)
    assert len(points["images"]) == len(images)
    for view in points["images"]:
        assert len(view["positions"]) >= 1
        for p, (oy, ox) in enumerate(view["positions"]):
            grid = _expected_grid(int(oy), int(ox), layer, stride)
            np.testing.assert_allclose(view["grid"][p], grid)
            np.testing.assert_allclose(view["points"][p], grid + np.array([1.0, 2.0]) * stride, atol=1e-5)
        if version == 2:
            np.testing.assert_allclose(view["mask"], 1.0, atol=1e-6)
        else:
            assert view["mask"] is None


def test_zero_offsets_give_exactly_the_regular_grid() -> None:
    model, images = _model(), _images()
    for view in sampling_points(model, images)["images"]:  # the predictor is zero-initialised
        np.testing.assert_array_equal(view["points"], view["grid"])


def test_regular_grid_of_stride_one_layer_is_centred_on_the_output_position() -> None:
    model, images = _model(), _images(1)
    name, layer = _last_layer(model)
    assert layer.stride == (1, 1) and layer.kernel_size == (3, 3)
    stride = SIZE / _input_shape(model, layer, images)[0]
    positions = [(0, 0), (1, 2), (3, 3)]
    view = sampling_points(model, images, name, positions=positions)["images"][0]
    offsets = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float) * stride
    for p, (oy, ox) in enumerate(positions):
        centre = np.array([(oy + 0.5) * stride - 0.5, (ox + 0.5) * stride - 0.5])
        np.testing.assert_allclose(view["centers"][p], centre)
        np.testing.assert_allclose(view["grid"][p], centre + offsets)


def test_points_are_where_the_op_really_samples() -> None:
    """A one-tap kernel over coordinate ramps outputs the (bilinear) coordinate it sampled."""
    torch.manual_seed(3)
    for stride in (1, 2):
        layer = DeformConv2d(2, 2, 3, stride=stride, padding=1, bias=False, version=1)
        with torch.no_grad():
            layer.offset_conv.bias.uniform_(-0.9, 0.9)  # random constant offsets, samples stay inside
        size = 12
        axis = torch.arange(size, dtype=torch.float32)
        ramps = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))
        images = ramps[None]  # channel 0 = row coordinate, channel 1 = column coordinate
        positions = [(2, 2), (3, 4)]
        view = sampling_points(nn.Sequential(layer), images, positions=positions)["images"][0]
        for tap in range(9):
            with torch.no_grad():
                layer.weight.zero_()
                layer.weight[0, 0].view(-1)[tap] = 1.0
                layer.weight[1, 1].view(-1)[tap] = 1.0
                sampled = layer(images)[0]
            for p, (oy, ox) in enumerate(positions):
                np.testing.assert_allclose(view["points"][p, tap], sampled[:, oy, ox].numpy(), atol=1e-5)


def test_drawing_shape_and_markers() -> None:
    model, images = _model(), _images(3)
    _set_constant_offsets(_last_layer(model)[1], dy=1.0, dx=-1.0)
    single = offset_view_image(model, images[:1])
    assert single.dtype == np.uint8 and single.ndim == 3 and single.shape[2] == 3
    height = single.shape[0]
    assert single.shape[1] == height and height >= 4 * SIZE  # one square panel, upscaled
    three = draw_offset_views(images, sampling_points(model, images), mean=(0.5,) * 3, std=(0.25,) * 3)
    gap = (three.shape[1] - 3 * height) / 2
    assert three.shape[0] == height and gap == int(gap) and 0 < gap < height / 10
    assert len(np.unique(three.reshape(-1, 3), axis=0)) > 10


def test_write_offset_views_writes_named_pngs(tmp_path) -> None:
    import matplotlib.image

    model, images = _model(), _images(2)
    names = [name for name, _ in deformable_layers(model)]
    paths = write_offset_views(model, images, tmp_path / "run")
    assert paths == [tmp_path / "run" / f"offsets_{names[-1]}.png"]
    paths = write_offset_views(model, images, tmp_path / "run", layer_name=[names[0], names[-1]])
    assert [p.name for p in paths] == [f"offsets_{names[0]}.png", f"offsets_{names[-1]}.png"]
    for path in paths:
        assert path.stat().st_size > 0
        picture = matplotlib.image.imread(path)
        assert picture.ndim == 3 and picture.shape[0] > 2 * SIZE


def test_regular_model_and_unknown_layer_raise_clear_errors() -> None:
    regular = MODELS.build("resnet34", num_classes=4, conv=CONVS.build("regular"), width=4)
    with pytest.raises(ValueError, match="no deformable layers.*conv=deformable"):
        sampling_points(regular, _images(1))
    with pytest.raises(ValueError, match="layer_name='stem' is not a deformable layer.*stages.3.2.conv2"):
        sampling_points(_model(), _images(1), layer_name="stem")


def test_model_mode_is_restored() -> None:
    model = _model().train()
    sampling_points(model, _images(1))
    assert model.training
    assert all(layer.pop_offset_stats() is None for _, layer in deformable_layers(model))
