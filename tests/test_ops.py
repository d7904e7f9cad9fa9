"""deform_conv2d: parity with torchvision (values + all gradients), gradcheck, validation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.nn.modules.utils import _pair

from dcn_experiments.ops import cpu_extension_available, deform_conv2d, deform_conv2d_reference

torchvision_ops = pytest.importorskip("torchvision.ops")

# (batch, in_ch, out_ch, H, W, kernel, stride, padding, dilation, weight_groups, offset_groups, mask, offset_scale)
CASES = {
    "basic": (2, 4, 6, 7, 7, 3, 1, 1, 1, 1, 1, True, 1.0),
    "no_mask": (2, 4, 6, 7, 7, 3, 1, 1, 1, 1, 1, False, 1.0),
    "groups": (3, 8, 6, 6, 5, 3, 1, 1, 1, 2, 4, True, 1.5),
    "non_square_kernel": (2, 4, 4, 9, 8, (3, 2), 1, (1, 0), 1, 1, 2, True, 1.0),
    "asymmetric": (1, 3, 5, 11, 9, 3, (2, 1), (0, 2), (1, 2), 1, 1, True, 1.0),
    "odd_batch_strided": (5, 6, 4, 8, 8, 3, 2, 1, 1, 2, 3, True, 0.7),
    "far_outside": (2, 4, 4, 6, 6, 3, 1, 1, 1, 1, 1, True, 12.0),
    "batch_0": (0, 4, 4, 6, 6, 3, 1, 1, 1, 1, 1, True, 1.0),
    "1x1": (2, 4, 4, 5, 5, 1, 1, 0, 1, 1, 1, True, 1.0),
    # 8 and 16 channels per offset group (the kernel's fixed-length channel loops, whole vectors in
    # the backward's sums) and 4, 8, 16 or 32 output channels in one weight group: the narrow-layer
    # forward (own small products in L1 instead of BLAS), as are "non_square_kernel", "far_outside"
    # and "1x1".
    "unet_like": (3, 16, 8, 12, 12, 3, 1, 1, 1, 1, 2, True, 1.0),
    "large_image": (2, 16, 16, 17, 17, 3, 1, 1, 1, 1, 1, True, 1.0),
    "narrow_32": (2, 8, 32, 10, 10, 3, 1, 1, 1, 1, 1, True, 1.0),
    # other output-channel counts: the GEMM path; 17x17 outputs are large enough for blocks inside
    # one image (the backward reads grad_out's NCHW planes in place)
    "wide_image": (2, 16, 24, 17, 17, 3, 1, 1, 1, 1, 1, True, 1.0),
    # more than 512 columns (64 channels x 9 taps) and 64 output channels: the GEMMs are cut into
    # panels of depth and width, with partial panels at both ends
    "panels": (2, 64, 80, 6, 6, 3, 1, 1, 1, 1, 1, True, 1.0),
    # fewer rows (2 x 3 x 3) than output channels, and 64 channels with more than 512 columns per
    # row: at batch 1 the row-split forward splits the output channels between the threads and
    # multiplies the weight in place by the transposed columns
    "few_rows": (2, 8, 48, 3, 3, 3, 1, 1, 1, 1, 1, True, 1.0),
    "deep_rows": (2, 64, 40, 9, 9, 3, 1, 1, 1, 1, 1, True, 1.0),
    # 9 images on 4 threads: the backward's chunks of images (3 of 3, none empty) and their
    # weight-gradient partials summed in order
    "nine_images": (9, 8, 8, 6, 6, 3, 1, 1, 1, 1, 1, True, 1.0),
}

# The C++ kernel splits work by image when there are at least two images per thread and by rows
# otherwise (batch-1 inference: threaded sampling, private input gradients per thread). The thread
# counts below select each path for a case's batch.
PATHS = ["by_image", "by_rows"]


@contextlib.contextmanager
def kernel_path(path: str, batch: int) -> Iterator[None]:
    """Run the block with the thread count that sends a batch of ``batch`` down ``path``."""
    if path == "by_image" and batch < 2:
        pytest.skip("one image is always split by rows")
    threads = max(1, batch // 2) if path == "by_image" else batch // 2 + 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs(case, dtype, seed=0, integer_offsets=False, noncontiguous=False):
    n, c, o, h, w, k, s, p, d, g, og, use_mask, scale = case
    k, s, p, d = _pair(k), _pair(s), _pair(p), _pair(d)
    gen = torch.Generator().manual_seed(seed)
    out_h = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    out_w = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    if noncontiguous:
        x = torch.randn(n, c, w, h, generator=gen, dtype=dtype).transpose(2, 3)
    offset = torch.randn(n, 2 * og * k[0] * k[1], out_h, out_w, generator=gen, dtype=dtype) * scale
    if integer_offsets:  # exactly on pixel centres and on the image border
        offset = offset.round().clamp(-2, 2)
    mask = torch.rand(n, og * k[0] * k[1], out_h, out_w, generator=gen, dtype=dtype) if use_mask else None
    weight = torch.randn(o, c // g, *k, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)
    return x, offset, weight, bias, s, p, d, mask


def _values_and_grads(fn, x, offset, weight, bias, s, p, d, mask):
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, weight, bias)]
    mask_leaf = mask.detach().clone().requires_grad_() if mask is not None else None
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3], s, p, d, mask_leaf)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = [t.grad for t in leaves] + ([mask_leaf.grad] if mask_leaf is not None else [])
    return out.detach(), grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(name: str, dtype: torch.dtype, path: str) -> None:
    args = _inputs(CASES[name], dtype)
    with kernel_path(path, CASES[name][0]):
        ours, our_grads = _values_and_grads(deform_conv2d, *args)
    ref, ref_grads = _values_and_grads(torchvision_ops.deform_conv2d, *args)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(ours, ref, **tol)
    assert len(our_grads) == len(ref_grads)
    for label, a, b in zip(["input", "offset", "weight", "bias", "mask"], our_grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, label=label: f"grad {label}: {m}")


@pytest.mark.parametrize("name", ["basic", "groups", "non_square_kernel"])
def test_integer_and_border_coordinates_match_torchvision(name: str) -> None:
    args = _inputs(CASES[name], torch.float64, integer_offsets=True)
    ours, our_grads = _values_and_grads(deform_conv2d, *args)
    ref, ref_grads = _values_and_grads(torchvision_ops.deform_conv2d, *args)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_noncontiguous_inputs() -> None:
    args = _inputs(CASES["groups"], torch.float64, noncontiguous=True)
    assert not args[0].is_contiguous()
    torch.testing.assert_close(deform_conv2d(*args[:4], *args[4:]), torchvision_ops.deform_conv2d(*args[:4], *args[4:]))


@pytest.mark.parametrize("layout", ["planes", "channels_last", "transposed"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["unet_like", "wide_image", "groups"])
def test_offsets_and_mask_sliced_from_one_tensor_or_expanded(name: str, path: str, layout: str) -> None:
    """DCNv2 predicts offsets and mask as one tensor and splits it by channel: the kernel reads such
    slices (and a mask expanded over the batch) in place, or transposes them per image when they
    come from a channels-last model, with the values and gradients of the same call on contiguous
    copies, bit for bit."""
    x, offset, weight, bias, s, p, d, mask = _inputs(CASES[name], torch.float32, seed=5)
    n, taps = offset.shape[0], mask.shape[1]

    def laid_out(t: torch.Tensor) -> torch.Tensor:
        if layout == "transposed":  # rows and columns swapped in memory: read through a copy
            return t.transpose(2, 3).contiguous().transpose(2, 3)
        return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    predicted = laid_out(torch.cat([offset, mask], dim=1))
    shared_mask = laid_out(mask[:1])

    def run(contiguous: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaf = predicted.clone().requires_grad_()
        mask_leaf = shared_mask.clone().requires_grad_()
        sliced_offset, sliced_mask = leaf.split([2 * taps, taps], dim=1)
        expanded_mask = mask_leaf.expand(n, -1, -1, -1)
        if contiguous:
            sliced_offset, sliced_mask, expanded_mask = (
                t.contiguous() for t in (sliced_offset, sliced_mask, expanded_mask)
            )
        else:
            assert not sliced_offset.is_contiguous() and not sliced_mask.is_contiguous()
        with kernel_path(path, n):
            out = deform_conv2d(x, sliced_offset, weight, bias, s, p, d, sliced_mask)
            out_shared = deform_conv2d(x, sliced_offset.detach(), weight, bias, s, p, d, expanded_mask)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((out + out_shared) * weights).sum().backward()
        return torch.stack([out.detach(), out_shared.detach()]), [leaf.grad, mask_leaf.grad]

    in_place, in_place_grads = run(contiguous=False)
    copied, copied_grads = run(contiguous=True)
    assert torch.equal(in_place, copied)
    for a, b in zip(in_place_grads, copied_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [12, 16, 64])
def test_offset_gradient_keeps_float32_precision_on_inputs_with_a_large_mean(channels: int) -> None:
    """The offset gradient is a sum over channels of differences between neighbouring pixels. On
    features far from zero (here mean 100, spread 0.1) the differences must be taken before the sum:
    summing each corner first and subtracting the sums loses ~2 digits (6e-5 relative error vs 2e-7).
    Measured where every corner is inside the image (at the border the zero outside dominates)."""
    gen = torch.Generator().manual_seed(channels)

    def draw(*shape, low=0.0, scale=1.0):  # float32 values, so that both sides see the same inputs
        return (low + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).float().double()

    x = draw(2, channels, 16, 16, low=100, scale=0.1)
    offset = (0.8 * (torch.rand(2, 18, 14, 14, generator=gen, dtype=torch.float64) - 0.5)).float().double()
    weight = draw(16, channels, 3, 3)
    mask = torch.rand(2, 9, 14, 14, generator=gen, dtype=torch.float64).float().double()
    grad_out = draw(2, 16, 14, 14)

    def offset_grad(fn, dtype):
        off = offset.to(dtype).requires_grad_()
        out = fn(x.to(dtype), off, weight.to(dtype), None, 1, 0, 1, mask.to(dtype))
        (grad,) = torch.autograd.grad(out, off, grad_out.to(dtype))
        return grad.double()[:, :, 1:-1, 1:-1]  # outputs whose corners are all inside (|offset| < 0.4)

    exact = offset_grad(torchvision_ops.deform_conv2d, torch.float64)
    ours = offset_grad(deform_conv2d, torch.float32)
    assert ((ours - exact).abs().max() / exact.abs().max()).item() < 5e-6


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "name", ["basic", "groups", "non_square_kernel", "asymmetric", "no_mask", "few_rows", "unet_like"]
)
def test_gradcheck_float64(name: str, path: str) -> None:
    n, c, o, h, w, k, s, p, d, g, og, use_mask, scale = CASES[name]
    # One image takes the row-split path on one thread (many threads on tiny inputs only add waits).
    small = (1 if path == "by_rows" else min(n, 2), c, o, min(h, 6), min(w, 6), k, s, p, d, g, og, use_mask, scale)
    x, offset, weight, bias, s, p, d, mask = _inputs(small, torch.float64, seed=1)
    tensors = [t.requires_grad_() for t in (x, offset, weight, bias)] + ([mask.requires_grad_()] if use_mask else [])

    def fn(x, offset, weight, bias, mask=None):
        return deform_conv2d(x, offset, weight, bias, s, p, d, mask)

    with kernel_path(path, x.shape[0]):
        assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("implementation", [deform_conv2d, deform_conv2d_reference], ids=["ours", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "name", ["basic", "groups", "odd_batch_strided", "no_mask", "large_image", "wide_image", "deep_rows"]
)
def test_output_and_input_grad_keep_the_input_memory_format(implementation, layout: str, name: str, path) -> None:
    """NCHW in -> NCHW out, channels-last in -> channels-last out (and the same for grad_input), with
    the values of the other layout: a channels-last result for an NCHW input sends the next layers
    into oneDNN's nhwc kernels (issue 14: a 1x1 stride-2 backward there crashes)."""
    x, offset, weight, bias, s, p, d, mask = _inputs(CASES[name], torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    with kernel_path(path, x.shape[0]):
        out = implementation(leaf, offset, weight, bias, s, p, d, mask)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        plain, (plain_grad, *_) = _values_and_grads(implementation, x.contiguous(), offset, weight, bias, s, p, d, mask)
    assert _layout(leaf) == layout
    assert _layout(out) == layout
    assert _layout(leaf.grad) == layout
    torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, plain_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["basic", "groups", "unet_like", "large_image", "wide_image", "few_rows", "deep_rows"])
def test_batch_of_one_equals_the_batched_result(name: str) -> None:
    """Batch-1 calls (split by rows over 2 threads) give each image's slice of the batched call
    (split by image over 1 thread): output and the per-image gradients; the weight and bias
    gradients are the sums over the images."""
    _, *rest = CASES[name]
    x, offset, weight, bias, s, p, d, mask = _inputs((4, *rest), torch.float32, seed=2)
    with kernel_path("by_image", 4):
        batched, batched_grads = _values_and_grads(deform_conv2d, x, offset, weight, bias, s, p, d, mask)
    singles = []
    with kernel_path("by_rows", 1):
        for i in range(4):
            one = [t[i : i + 1] if t is not None else None for t in (x, offset, mask)]
            leaves = [t.detach().clone().requires_grad_() for t in (one[0], one[1], weight, bias)]
            mask_leaf = one[2].detach().clone().requires_grad_() if one[2] is not None else None
            out = deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], s, p, d, mask_leaf)
            grad_out = torch.linspace(-1, 1, batched.numel()).view_as(batched)[i : i + 1]
            out.backward(grad_out)
            singles.append((out.detach(), [t.grad for t in leaves] + [mask_leaf.grad]))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([o for o, _ in singles]), batched, **tol)
    for index, label in ((0, "input"), (1, "offset"), (4, "mask")):
        torch.testing.assert_close(torch.cat([g[index] for _, g in singles]), batched_grads[index], **tol, msg=label)
    for index, label in ((2, "weight"), (3, "bias")):
        total = torch.stack([g[index] for _, g in singles]).sum(0)
        torch.testing.assert_close(total, batched_grads[index], rtol=1e-4, atol=1e-4, msg=label)


@pytest.mark.parametrize("path", PATHS)
def test_huge_offsets_sample_zeros_and_nan_offsets_propagate(path: str) -> None:
    """Sampling points far outside the image (|offset| up to 1e30, beyond int32 and float's exact
    integers) read zeros, so only the bias is left, with finite gradients; a NaN offset makes its
    output position NaN rather than being hidden."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 6, 6, generator=gen, requires_grad=True)
    weight, bias = torch.randn(4, 8, 3, 3, generator=gen), torch.randn(4, generator=gen)
    offset = torch.zeros(4, 18, 6, 6)
    offset[0, :, 2, 3], offset[1, :, 1, 1], offset[2, :, 4, 4] = 1e30, -1e30, 3e7
    offset.requires_grad_()
    with kernel_path(path, 4):
        out = deform_conv2d(x, offset, weight, bias, padding=1)
        out.sum().backward()
        with_nan = offset.detach().clone()
        with_nan[3, 0, 5, 5] = float("nan")
        nan_out = deform_conv2d(x.detach(), with_nan, weight, bias, padding=1)
    for b, i, j in ((0, 2, 3), (1, 1, 1), (2, 4, 4)):
        torch.testing.assert_close(out[b, :, i, j], bias)
    assert torch.isfinite(x.grad).all() and torch.isfinite(offset.grad).all()
    assert torch.isnan(nan_out[3, :, 5, 5]).all()
    assert torch.isnan(nan_out).sum() == 4  # that position only


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["basic", "large_image", "wide_image", "few_rows", "deep_rows"])
def test_forward_under_inference_mode(name: str, layout: str, path: str) -> None:
    """Every forward path (narrow, products per block or per image, row split by rows or by output
    channels) runs under ``torch.inference_mode``, whose output is an inference tensor written by
    the kernel's worker threads, and gives the result of a ``no_grad`` call."""
    _, *rest = CASES[name]
    # batch 4: two images per thread on the image path, so that the worker threads write the output
    batch = 4 if path == "by_image" else CASES[name][0]
    x, offset, weight, bias, s, p, d, mask = _inputs((batch, *rest), torch.float32, seed=6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with kernel_path(path, x.shape[0]):
        with torch.no_grad():
            expected = deform_conv2d(x, offset, weight, bias, s, p, d, mask)
        with torch.inference_mode():
            out = deform_conv2d(x, offset, weight, bias, s, p, d, mask)
    assert out.is_inference() and _layout(out) == layout
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["basic", "large_image", "wide_image", "few_rows", "deep_rows", "panels"])
def test_onednn_ukernel_matches_blas(name: str, path: str) -> None:
    """The kernel's float GEMMs go through oneDNN's brgemm ukernel; with oneDNN turned off ATen runs
    them through BLAS instead. Both give the same output and gradients (within float rounding), so
    the ukernel is handed the right operands, strides and accumulation flags."""
    args = _inputs(CASES[name], torch.float32, seed=7)
    with kernel_path(path, args[0].shape[0]):
        through_onednn = _values_and_grads(deform_conv2d, *args)
        torch.backends.mkldnn.enabled = False
        try:
            through_blas = _values_and_grads(deform_conv2d, *args)
        finally:
            torch.backends.mkldnn.enabled = True
    torch.testing.assert_close(through_onednn[0], through_blas[0], rtol=1e-5, atol=1e-5)
    for label, a, b in zip(
        ("input", "offset", "weight", "bias", "mask"), through_onednn[1], through_blas[1], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=label)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_without_output_channels(dtype: torch.dtype, path: str) -> None:
    """A weight with 0 output channels gives an empty output and all-zero gradients for input,
    offset and mask (an empty sum), on every path; dirty memory from earlier tensors must not leak
    into the gradients."""
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):  # leave non-zero values in freed memory of the gradients' sizes
        torch.full((4, 6, 6, 27), 7.0, dtype=dtype).sum()
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=dtype, requires_grad=True)
    offset = torch.randn(4, 18, 4, 4, generator=gen, dtype=dtype, requires_grad=True)
    mask = torch.rand(4, 9, 4, 4, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.zeros(0, 3, 3, 3, dtype=dtype, requires_grad=True)
    with kernel_path(path, 4):
        out = deform_conv2d(x, offset, weight, mask=mask)
        out.sum().backward()
    assert out.shape == (4, 0, 4, 4)
    for grad in (x.grad, offset.grad, mask.grad):
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("path", PATHS)
def test_reused_scratch_across_modes_and_shapes(path: str) -> None:
    """The kernel keeps its channels-last scratch copies per thread and reuses them: a call under
    ``inference_mode``, then training calls on a larger and a smaller input, then the first input
    again, each give the values and gradients of an independent computation (torchvision's)."""
    shapes = ("large_image", "wide_image", "basic", "large_image")
    for step, name in enumerate(shapes):
        args = _inputs(CASES[name], torch.float32, seed=10 + step)
        with kernel_path(path, args[0].shape[0]):
            with torch.inference_mode():
                deform_conv2d(*args)
            ours, our_grads = _values_and_grads(deform_conv2d, *args)
        theirs, their_grads = _values_and_grads(torchvision_ops.deform_conv2d, *args)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        for a, b in zip(our_grads, their_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["large_image", "nine_images"])
@pytest.mark.parametrize("path", PATHS)
def test_gradients_are_bitwise_reproducible(path: str, name: str) -> None:
    """Same inputs, same threads -> identical bits (exact resume needs it), on both kernel paths."""
    args = _inputs(CASES[name], torch.float32, seed=3)
    with kernel_path(path, args[0].shape[0]):
        first = _values_and_grads(deform_conv2d, *args)
        second = _values_and_grads(deform_conv2d, *args)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


@pytest.mark.parametrize("path", PATHS)
def test_backward_op_under_inference_mode(path: str) -> None:
    """The raw backward called under inference_mode (its worker threads do not inherit the mode)
    gives the bits it gives outside."""
    x, offset, weight, _, s, p, d, mask = _inputs(CASES["nine_images"], torch.float32, seed=7)
    grad_out = torch.randn(9, 8, 6, 6)
    backward = torch.ops.dcn_experiments_cpu.deform_conv2d_backward
    args = (grad_out, x, weight, offset, mask, *s, *p, *d, 1, True, True, True, True, True)
    with kernel_path(path, 9):
        plain = backward(*args)
        with torch.inference_mode():
            inferred = backward(*args)
    for a, b in zip(plain, inferred, strict=True):
        assert torch.equal(a, b)


def test_reference_matches_torchvision() -> None:
    args = _inputs(CASES["groups"], torch.float64)
    ours, our_grads = _values_and_grads(deform_conv2d_reference, *args)
    ref, ref_grads = _values_and_grads(torchvision_ops.deform_conv2d, *args)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_extension_is_built_here() -> None:
    """CI machines have g++ and ninja: the fast kernel must be in use, not the fallback."""
    assert cpu_extension_available()


def test_int_and_tuple_arguments_agree() -> None:
    x, offset, weight, bias, _, _, _, mask = _inputs(CASES["basic"], torch.float64)
    torch.testing.assert_close(
        deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask),
        deform_conv2d(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask),
    )


def test_autocast_bfloat16_returns_input_dtype() -> None:
    x, offset, weight, bias, s, p, d, mask = _inputs(CASES["basic"], torch.float32)
    out = deform_conv2d(x.bfloat16(), offset.bfloat16(), weight, bias, s, p, d, mask.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), deform_conv2d(x, offset, weight, bias, s, p, d, mask), rtol=0.05, atol=0.2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offset_channels": 17}, "offset tensor at dimension 1"),
        ({"mask_channels": 5}, "mask shape"),
        ({"weight_in": 3}, "divisible by weight.shape"),
        ({"offset_size": 5}, "offset spatial size"),
        ({"bias": 7}, "bias must have shape"),
    ],
)
def test_invalid_arguments_raise_clear_errors(change: dict, message: str) -> None:
    x = torch.randn(1, 4, 6, 6)
    weight = torch.randn(4, change.get("weight_in", 4), 3, 3)
    offset = torch.randn(1, change.get("offset_channels", 18), change.get("offset_size", 6), 6)
    mask = torch.randn(1, change.get("mask_channels", 9), 6, 6)
    bias = torch.randn(change.get("bias", 4))
    with pytest.raises(RuntimeError, match=message):
        deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch, caplog, python_op_kernels) -> None:
    from dcn_experiments.ops import deform_conv as module

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(module, "_EXTENSION_SOURCES", (broken,))
    monkeypatch.setattr(module, "_extension_state", {})
    monkeypatch.setenv("DCN_EXTENSION_DIR", str(tmp_path / "build"))
    with pytest.warns(RuntimeWarning, match="falling back to the slower pure-PyTorch implementation"):
        assert module.cpu_extension_available() is False
    # also a log record, so the run's own log (train.log) says so
    assert any("falling back" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    x, offset, weight, bias, s, p, d, mask = _inputs(CASES["basic"], torch.float64)
    module.reset_backend_usage()
    torch.testing.assert_close(
        module.deform_conv2d(x, offset, weight, bias, s, p, d, mask),
        torchvision_ops.deform_conv2d(x, offset, weight, bias, s, p, d, mask),
    )
    assert module.backend_usage() == {module.PYTORCH_FALLBACK: 1}  # recorded as deformable_backend
