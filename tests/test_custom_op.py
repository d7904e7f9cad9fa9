"""``torch.ops.dcn_experiments.deform_conv2d``: a real torch.library op (opcheck), traced as one node by
torch.compile(fullgraph=True) and torch.export, counted when it really runs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from dcn_experiments.models import CONVS, MODELS, DeformConv2d, deformable_layers
from dcn_experiments.ops import PYTORCH_FALLBACK, backend_usage, deform_conv2d, precision_usage, reset_backend_usage
from dcn_experiments.ops import deform_conv as module

OP = torch.ops.dcn_experiments.deform_conv2d.default
BACKWARD_OP = torch.ops.dcn_experiments.deform_conv2d_backward.default

# (in_ch, out_ch, H, W, kernel, stride, padding, dilation, weight_groups, offset_groups, mask)
GEOMETRIES = {
    "plain": (4, 6, 7, 7, 3, 1, 1, 1, 1, 1, True),
    "groups_and_offset_groups": (8, 6, 6, 5, 3, 1, 1, 1, 2, 4, True),
    "strided_dilated": (4, 4, 9, 8, 3, 2, 2, 2, 1, 2, True),
    "no_mask": (4, 6, 7, 7, 3, 1, 1, 1, 1, 1, False),
    "non_square_no_bias": (3, 4, 8, 6, (3, 1), (2, 1), (1, 0), 1, 1, 1, True),
}


def _op_args(geometry, batch=2, dtype=torch.float64, bias=True, seed=0):
    c, o, h, w, k, s, p, d, g, og, use_mask = geometry
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    k, s, p, d = pair(k), pair(s), pair(p), pair(d)
    out_h = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    out_w = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    x = make(batch, c, h, w)
    offset = make(batch, 2 * og * k[0] * k[1], out_h, out_w)
    weight = make(o, c // g, *k)
    mask = torch.rand(batch, og * k[0] * k[1], out_h, out_w, generator=gen, dtype=dtype).requires_grad_()
    return (x, offset, weight, make(o) if bias else None, mask if use_mask else None, list(s), list(p), list(d))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_opcheck_passes(name: str) -> None:
    """Schema, autograd registration, fake kernel vs real kernel, AOT dispatch with dynamic shapes."""
    args = _op_args(GEOMETRIES[name], bias=name != "non_square_no_bias")
    result = torch.library.opcheck(OP, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_backward_op_with_partial_output_mask() -> None:
    x, offset, weight, bias, mask, s, p, d = _op_args(GEOMETRIES["groups_and_offset_groups"])
    grad_out = torch.randn(2, 6, 6, 5, dtype=torch.float64)
    need = [False, True, True, False, True]
    args = (grad_out, x.detach(), offset.detach(), weight.detach(), bias.detach(), mask.detach(), s, p, d, need)
    result = torch.library.opcheck(BACKWARD_OP, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result
    grads = BACKWARD_OP(*args)
    assert [tuple(g.shape) for g in grads] == [(0,), tuple(offset.shape), tuple(weight.shape), (0,), tuple(mask.shape)]


def test_opcheck_with_offsets_and_mask_sliced_from_a_channels_last_prediction() -> None:
    """A channels-last model's DCNv2 layer splits offsets and mask from one channels-last prediction:
    the real kernels give their gradients in the layout the fake kernel promises (channels-last),
    so that the prediction's gradient is channels-last without a copy."""
    x, offset, weight, bias, mask, s, p, d = _op_args(GEOMETRIES["groups_and_offset_groups"])
    taps = mask.shape[1]
    predicted = torch.cat([offset, mask], dim=1).contiguous(memory_format=torch.channels_last)
    offset, mask = predicted.detach().split([2 * taps, taps], dim=1)
    x = x.detach().contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    args = (grad_out, x, offset, weight.detach(), bias.detach(), mask, s, p, d, [True] * 5)
    result = torch.library.opcheck(BACKWARD_OP, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result
    leaf = predicted.detach().requires_grad_()
    sliced_offset, sliced_mask = leaf.split([2 * taps, taps], dim=1)
    OP(x, sliced_offset, weight.detach(), bias.detach(), sliced_mask, s, p, d).sum().backward()
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last)
    # the C++ kernel itself writes them channels-last (no copy in the op's Python wrapper)
    if module.cpu_extension_available():
        raw = torch.ops.dcn_experiments_cpu.deform_conv2d_backward(
            grad_out, x, weight.detach(), offset, mask, *s, *p, *d, 4, True, True, True, True, True
        )
        assert raw[1].is_contiguous(memory_format=torch.channels_last) and not raw[1].is_contiguous()
        assert raw[2].is_contiguous(memory_format=torch.channels_last) and not raw[2].is_contiguous()


def test_opcheck_passes_on_the_reference_fallback(monkeypatch, python_op_kernels) -> None:
    """Without the C++ kernel the CPU kernel serves the reference (its backward through torch.func)."""
    small = (4, 4, 5, 5, 3, 1, 1, 1, 2, 2, True)
    args = _op_args(small)
    with_extension = _values_and_grads(args)
    monkeypatch.setattr(module, "_extension_state", {"loaded": False})
    reset_backend_usage()
    result = torch.library.opcheck(
        OP, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
    assert set(result.values()) == {"SUCCESS"}, result
    assert set(backend_usage()) == {PYTORCH_FALLBACK}
    for got, want in zip(_values_and_grads(args), with_extension, strict=True):
        torch.testing.assert_close(got, want)


def _values_and_grads(args: tuple) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    out = OP(*leaves)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves[:5] if t is not None]


def test_fake_kernel_gives_shape_dtype_and_memory_format() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 8, 10, 12, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        offset = torch.empty(3, 2 * 2 * 9, 5, 6, dtype=torch.bfloat16)
        weight = torch.empty(16, 4, 3, 3)
        out = deform_conv2d(x, offset, weight, None, stride=2, padding=1)
        assert out.shape == (3, 16, 5, 6)
        assert out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        with pytest.raises(RuntimeError, match="offset spatial size"):
            deform_conv2d(x, offset, weight, None, stride=1, padding=1)


def test_mixed_dtypes_compute_in_float32_and_return_the_input_dtype() -> None:
    """The autocast rule: bfloat16 activations with float32 weights compute in float32 (counted so)."""
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"], dtype=torch.float32)
    )
    reset_backend_usage()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x.bfloat16(), offset.bfloat16(), weight, bias, s, p, d, mask.bfloat16())
    assert out.dtype == torch.bfloat16
    assert precision_usage() == {"float32": 1}
    rounded = [t.bfloat16().float() for t in (x, offset, mask)]
    expected = deform_conv2d(rounded[0], rounded[1], weight, bias, s, p, d, rounded[2])
    torch.testing.assert_close(out, expected.bfloat16())


def _tiny(model: str, version: int = 2, offset_groups: int = 1) -> nn.Module:
    conv = CONVS.build("deformable", placement="all", version=version, offset_groups=offset_groups)
    net = MODELS.build(model, num_classes=3, conv=conv, width=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # offsets away from zero, so that sampling between pixels is exercised
        for _, layer in deformable_layers(net):
            layer.offset_conv.weight.copy_(torch.randn(layer.offset_conv.weight.shape, generator=gen) * 0.02)
    return net


def _forward_backward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = net(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def _assert_compiled_equals_eager(model: str, backend: str) -> None:
    torch._dynamo.reset()
    net = _tiny(model).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    eager, eager_grads = _forward_backward(net, x)
    reset_backend_usage()
    compiled, compiled_grads = _forward_backward(torch.compile(net, fullgraph=True, backend=backend), x)
    # the op really ran once per deformable layer (the counters see compiled runs too)
    assert backend_usage() == {module.CPP_CPU: len(list(deformable_layers(net)))}
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["resnet34", "unet"])
def test_compiles_fullgraph_forward_and_backward(model: str) -> None:
    """fullgraph=True: a graph break would raise. aot_eager traces forward and backward (fake
    kernels, autograd registration) without Inductor's code generation (minutes on 2 cores)."""
    _assert_compiled_equals_eager(model, backend="aot_eager")


@pytest.mark.slow
def test_compiles_fullgraph_with_inductor() -> None:
    """Inductor (the default backend) around the op, forward and backward, on a small deformable
    block: whole tiny models take minutes of code generation on 2 cores (the ResNet-34 and U-Net
    were checked by hand, see the README)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = DeformConv2d(4, 6, 3, stride=2, padding=1, offset_groups=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), conv, nn.BatchNorm2d(6), nn.ReLU()).eval()
    with torch.no_grad():
        conv.offset_conv.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, 12, 12)
    eager, eager_grads = _forward_backward(net, x)
    reset_backend_usage()
    compiled, compiled_grads = _forward_backward(torch.compile(net, fullgraph=True), x)
    assert backend_usage() == {module.CPP_CPU: 1}
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_mode_compiles_without_graph_breaks() -> None:
    """The layers record offset statistics in training mode: that must not break the graph."""
    torch._dynamo.reset()
    net = _tiny("unet").train()
    x = torch.randn(2, 3, 16, 16)
    out = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    assert all(layer.pop_offset_stats() is not None for _, layer in deformable_layers(net))


@pytest.mark.parametrize(("model", "version"), [("resnet34", 2), ("unet", 1)])
def test_export_shows_the_op_as_one_node_per_layer(model: str, version: int) -> None:
    net = _tiny(model, version=version).eval()
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(net, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == len(list(deformable_layers(net)))
    assert not any("torchvision" in str(t) or "dcn_experiments_cpu" in str(t) for t in targets)
    torch.testing.assert_close(program.module()(x), net(x))


def test_export_with_dynamic_batch() -> None:
    net = _tiny("resnet34", offset_groups=2).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(program.module()(x), net(x))


def test_runs_under_inference_mode() -> None:
    """The C++ kernel's worker threads do not inherit InferenceMode (thread-local)."""
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"], batch=3)
    )
    expected = deform_conv2d(x, offset, weight, bias, s, p, d, mask)
    with torch.inference_mode():
        torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, s, p, d, mask), expected)


@pytest.mark.parametrize("name", ["groups_and_offset_groups", "no_mask", "non_square_no_bias"])
def test_cuda_dispatch_point_calls_torchvision_with_the_right_arguments(name: str, monkeypatch) -> None:
    """No GPU here: torchvision's CPU kernels stand in for its CUDA ones behind ``_cuda_forward`` /
    ``_cuda_backward`` (same schema), checking argument order and the order of the gradients."""
    monkeypatch.setattr(module, "_cuda_kernel_choice", ["torchvision"])
    args = _op_args(GEOMETRIES[name], bias=name != "non_square_no_bias")
    x, offset, weight, bias, mask, s, p, d = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    geometry = module._geometry(s, p, d)
    offset_groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    expected, *expected_grads = _values_and_grads(args)
    reset_backend_usage()
    out = module._cuda_forward(x, offset, weight, bias, mask, geometry, offset_groups)
    assert backend_usage() == {module.TORCHVISION_CUDA: 1}
    torch.testing.assert_close(out, expected)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    need = (True, True, True, bias is not None, mask is not None)
    grads = module._cuda_backward(grad_out, x, offset, weight, bias, mask, geometry, offset_groups, need)
    got = [g for g, n in zip(grads, need, strict=True) if n]
    for a, b in zip(got, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


# --- the C++ library's own CPU and autograd kernels of the op (deform_conv2d_op.cpp) -----------------


@pytest.fixture
def cpp_library() -> None:
    """The C++ library loaded, so that its kernels of the op serve CPU calls (skips where it cannot be built)."""
    if not module.cpu_extension_available():
        pytest.skip("the C++ library cannot be built here")


def _run_with(kernels: str, args: tuple, requires: tuple[bool, ...]) -> tuple[torch.Tensor, list, str | None]:
    """Output, gradients and the output's grad_fn type of one forward+backward, served by the C++
    library's kernels (``kernels="cpp"``) or by the op's Python kernels and autograd (``"python"``)."""
    previous = torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(kernels == "cpp")
    try:
        leaves = [
            t.detach().clone().requires_grad_(r) if isinstance(t, torch.Tensor) else t
            for t, r in zip(args, (*requires, False, False, False), strict=True)
        ]
        out = OP(*leaves)
        grad_fn = type(out.grad_fn).__name__ if out.grad_fn is not None else None
        if out.requires_grad:
            weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float32).view(out.shape).to(out.dtype)
            (out * weights).sum().backward()
        grads = [t.grad if isinstance(t, torch.Tensor) else None for t in leaves[:5]]
        return out.detach(), grads, grad_fn
    finally:
        torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(previous)


def _with_layout(args: list, layout: str, dtype: str) -> list:
    """The op's arguments in one of the layouts and dtype mixes a model hands it."""
    x, offset, weight, bias, mask = (t.detach() if t is not None else None for t in args[:5])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced_channels_last_prediction" and mask is not None:
        # DCNv2's split of one channels-last prediction: offsets and mask are channel slices of it
        prediction = torch.cat([offset, mask], dim=1).contiguous(memory_format=torch.channels_last)
        offset, mask = prediction.split([offset.shape[1], mask.shape[1]], dim=1)
    if dtype == "float64":
        x, offset, weight, mask = (t.double() if t is not None else None for t in (x, offset, weight, mask))
        bias = bias.double() if bias is not None else None
    if dtype == "bfloat16 activations":  # autocast-style: half activations, float32 parameters
        x, offset, mask = (t.bfloat16() if t is not None else None for t in (x, offset, mask))
    return [x, offset, weight, bias, mask, *args[5:]]


@pytest.mark.parametrize(
    ("geometry", "bias", "requires"),
    [
        ("plain", True, (True, True, True, True, True)),
        ("no_mask", True, (True, True, True, True, False)),
        ("non_square_no_bias", False, (True, True, True, False, True)),
        # autograd numbers its edges by the tensors given: with no bias the mask is edge 3
        ("non_square_no_bias", False, (False, False, False, False, True)),
        ("plain", True, (False, True, False, True, False)),
        ("groups_and_offset_groups", True, (True, False, True, False, True)),
    ],
)
@pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        ("nchw", "float32"),
        ("channels_last", "float32"),
        ("sliced_channels_last_prediction", "float32"),
        ("nchw", "float64"),
        ("channels_last", "bfloat16 activations"),
    ],
)
def test_cpp_kernels_give_the_python_kernels_bits(
    cpp_library, geometry: str, bias: bool, requires: tuple, layout: str, dtype: str
) -> None:
    """Once the library is loaded, CPU calls run its C++ kernels (no Python per call): the same
    outputs, gradients, dtypes and memory formats as the Python kernels, for any subset of gradients."""
    args = _with_layout(list(_op_args(GEOMETRIES[geometry], dtype=torch.float32, bias=bias)), layout, dtype)
    cpp_out, cpp_grads, cpp_fn = _run_with("cpp", tuple(args), requires)
    py_out, py_grads, py_fn = _run_with("python", tuple(args), requires)
    assert cpp_fn == "CppFunction" and py_fn != cpp_fn  # each path really ran
    assert torch.equal(cpp_out, py_out) and cpp_out.stride() == py_out.stride() and cpp_out.dtype == py_out.dtype
    for got, want, needed in zip(cpp_grads, py_grads, requires, strict=True):
        assert (got is None) == (want is None) == (not needed)
        if want is not None:
            assert torch.equal(got, want) and got.stride() == want.stride() and got.dtype == want.dtype


def test_cpp_kernels_take_the_autocast_rule_and_count_calls(cpp_library) -> None:
    """Half-precision inputs compute in float32 and come back in their dtype; float64 stays float64;
    each call is counted once, by compute dtype, as the Python kernels count theirs."""
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"], dtype=torch.float32)
    )
    reset_backend_usage()
    half = deform_conv2d(x.bfloat16(), offset.bfloat16(), weight, bias, s, p, d, mask.bfloat16())
    double = deform_conv2d(x.double(), offset.double(), weight.double(), bias.double(), s, p, d, mask.double())
    assert half.dtype == torch.bfloat16 and double.dtype == torch.float64
    assert backend_usage() == {module.CPP_CPU: 2}
    assert precision_usage() == {"float32": 1, "float64": 1}
    assert torch.ops.dcn_experiments_cpu.public_op_calls() == [1, 1]  # both served by the C++ kernels
    reset_backend_usage()
    assert backend_usage() == {} and precision_usage() == {}


def test_cpp_backward_has_no_double_backward(cpp_library) -> None:
    """create_graph gives first derivatives; differentiating them again says there is no formula,
    as the Python formula did, rather than returning a silently wrong second derivative."""
    x, offset, weight, bias, mask, s, p, d = _op_args(GEOMETRIES["plain"])
    out = OP(x, offset, weight, bias, mask, s, p, d)
    assert type(out.grad_fn).__name__ == "CppFunction"
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        grad_x.sum().backward()


def test_cpp_autograd_refuses_forward_mode(cpp_library) -> None:
    """Forward-mode AD has no formula: the C++ autograd says so (the Python formula returned no tangent)."""
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"])
    )
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="jvp is not implemented"):
        OP(forward_ad.make_dual(x, torch.ones_like(x)), offset, weight, bias, mask, s, p, d)


def _bad_arguments() -> dict[str, tuple]:
    """Arguments of the op, each wrong in one way the argument checks name."""
    x, offset, weight = torch.randn(2, 4, 6, 6), torch.randn(2, 18, 6, 6), torch.randn(4, 4, 3, 3)
    good = dict(input=x, offset=offset, weight=weight, bias=torch.randn(4), mask=torch.rand(2, 9, 6, 6))
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1])
    cases = {
        "input_3d": dict(input=x[0]),
        "offset_3d": dict(offset=offset[0]),
        "weight_2d": dict(weight=weight[0, 0]),
        "mask_3d": dict(mask=torch.rand(9, 6, 6)),
        "stride_zero": dict(stride=[0, 1]),
        "negative_padding": dict(padding=[1, -1]),
        "dilation_zero": dict(dilation=[1, 0]),
        "three_strides": dict(stride=[1, 1, 1]),
        "no_input_channels": dict(input=torch.randn(2, 0, 6, 6)),
        "weight_channels": dict(weight=torch.randn(4, 3, 3, 3)),
        "weight_groups": dict(weight=torch.randn(5, 2, 3, 3)),
        "offset_channels": dict(offset=torch.randn(2, 17, 6, 6)),
        "empty_kernel": dict(weight=torch.randn(4, 4, 0, 3)),
        "offset_groups": dict(offset=torch.randn(2, 54, 6, 6), mask=torch.rand(2, 27, 6, 6)),
        "offset_batch": dict(offset=torch.randn(3, 18, 6, 6)),
        "too_small": dict(padding=[0, 0], stride=[2, 2], dilation=[4, 4]),
        "offset_size": dict(offset=torch.randn(2, 18, 5, 6)),
        "mask_shape": dict(mask=torch.rand(2, 9, 6, 5)),
        "bias_shape": dict(bias=torch.randn(3)),
        "integer_weight": dict(weight=weight.long()),
        "uint16_input": dict(input=torch.zeros(2, 4, 6, 6, dtype=torch.uint16)),
        "complex_offset": dict(offset=offset.to(torch.complex64)),
        "bool_mask": dict(mask=torch.ones(2, 9, 6, 6, dtype=torch.bool)),
        "float8_bias": dict(bias=torch.zeros(4).to(torch.float8_e4m3fn)),
    }
    order = ("input", "offset", "weight", "bias", "mask", "stride", "padding", "dilation")
    return {name: tuple((good | geometry | change)[k] for k in order) for name, change in cases.items()}


def _errors(kernels: str, call: Callable[[], object]) -> str:
    previous = torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(kernels == "cpp")
    try:
        with pytest.raises(RuntimeError) as error:
            call()
        return str(error.value)
    finally:
        torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(previous)


@pytest.mark.parametrize("case", sorted(_bad_arguments()))
def test_cpp_and_python_argument_checks_say_the_same(cpp_library, case: str) -> None:
    """The C++ kernels repeat the Python argument checks: the same error, word for word, for the op
    and for its backward."""
    args = _bad_arguments()[case]
    grad_out = torch.randn(2, 4, 6, 6)
    for call in (lambda: OP(*args), lambda: BACKWARD_OP(grad_out, *args, [True] * 5)):
        cpp, python = _errors("cpp", call), _errors("python", call)
        assert cpp == python
        assert cpp.startswith("deform_conv2d: ") and "\n" not in cpp.replace("\nGot offset.shape", "")


def test_backward_op_checks_the_gradient_dtype_as_the_python_kernel_does(cpp_library) -> None:
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"], dtype=torch.float32)
    )
    args = (torch.ones(2, 6, 7, 7, dtype=torch.int64), x, offset, weight, bias, mask, s, p, d, [True] * 5)
    cpp, python = (_errors(kernels, lambda: BACKWARD_OP(*args)) for kernels in ("cpp", "python"))
    assert cpp == python
    assert python.startswith("deform_conv2d: expected floating-point tensors, got [torch.int64, torch.float32")


@pytest.mark.parametrize("values", [4, 6])
def test_backward_op_wants_five_output_mask_values(cpp_library, values: int) -> None:
    x, offset, weight, bias, mask, s, p, d = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args(GEOMETRIES["plain"])
    )
    args = (torch.randn(2, 6, 7, 7, dtype=torch.float64), x, offset, weight, bias, mask, s, p, d, [True] * values)
    cpp, python = (_errors(kernels, lambda: BACKWARD_OP(*args)) for kernels in ("cpp", "python"))
    assert cpp == python == f"deform_conv2d_backward: output_mask must have 5 values, got {values}"
