"""The Triton deformable-convolution kernels, run on CPU by Triton's interpreter (no GPU needed).

Triton reads ``TRITON_INTERPRET`` when it is first imported (its own ``tl.cdiv``/``tl.sum`` are
kernels too), and importing torch already imports it, so the kernels run in one child process
started with ``TRITON_INTERPRET=1`` (this file, run as a script). It computes every case once and
reports errors as JSON; the tests below assert on them. Nothing leaks into the other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import dcn_experiments.ops.triton_deform as triton_deform_module
from dcn_experiments.ops import cpu_extension_available, deform_conv2d, deform_conv2d_reference

NAMES = ("input", "offset", "weight", "bias", "mask")


def _load_copy(name: str):
    spec = importlib.util.spec_from_file_location(name, triton_deform_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _problem(n=2, c=4, o=4, h=6, w=7, k=3, stride=1, pad=1, dil=1, groups=1, offset_groups=1, mask=True, bias=True):
    """Random float64 tensors (offsets of a few pixels, many samples near or past the border)."""
    g = torch.Generator().manual_seed(n * 1000 + c * 100 + groups * 10 + offset_groups + stride + dil)
    ho = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    tensors = {
        "input": torch.randn(n, c, h, w, generator=g, dtype=torch.float64),
        "offset": 2.0 * torch.randn(n, 2 * offset_groups * k * k, ho, wo, generator=g, dtype=torch.float64),
        "weight": torch.randn(o, c // groups, k, k, generator=g, dtype=torch.float64) / (k * (c // groups) ** 0.5),
        "bias": torch.randn(o, generator=g, dtype=torch.float64) if bias else None,
        "mask": torch.rand(n, offset_groups * k * k, ho, wo, generator=g, dtype=torch.float64) if mask else None,
    }
    grad_out = torch.randn(n, o, ho, wo, generator=g, dtype=torch.float64)
    return tensors, grad_out, (stride, pad, dil)


def _run(fn, tensors, grad_out, geometry, dtype):
    """Output and the gradients of every given tensor, computing in ``dtype``."""
    leaves = {k: None if t is None else t.detach().to(dtype).clone().requires_grad_() for k, t in tensors.items()}
    stride, pad, dil = geometry
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], stride, pad, dil, leaves["mask"])
    out.backward(grad_out.to(out.dtype))
    return out, {k: t.grad for k, t in leaves.items() if t is not None}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _float64_truth(tensors, grad_out, geometry, dtype):
    """The float64 reference on the inputs as the kernel sees them (rounded to ``dtype``)."""
    rounded = {k: None if t is None else t.to(dtype).double() for k, t in tensors.items()}
    return _run(deform_conv2d_reference, rounded, grad_out.to(dtype).double(), geometry, torch.float64)


CASES = {
    "v2-3x3": {},
    "groups2-offsetgroups2-stride2-dil2": dict(c=8, o=6, groups=2, offset_groups=2, stride=2, dil=2, pad=2),
    "v1-no-bias-offsetgroups2": {"c": 4, "offset_groups": 2, "mask": False, "bias": False, "h": 4, "w": 5},
    "groups4-finer-than-offsetgroups2": {"c": 4, "o": 8, "groups": 4, "offset_groups": 2, "h": 4, "w": 4},
}
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _errors(out, grads, ref_out, ref_grads) -> dict:
    return {
        "out": _rel_err(out, ref_out),
        "out_dtype": str(out.dtype),
        "out_shape": list(out.shape) == list(ref_out.shape),
        "grads": {k: _rel_err(g, ref_grads[k]) for k, g in grads.items()},
        "grad_dtypes": {k: str(g.dtype) for k, g in grads.items()},
        "grad_shapes": {k: list(g.shape) == list(ref_grads[k].shape) for k, g in grads.items()},
    }


def _routing() -> dict:
    """The op's CUDA dispatch point called with CPU tensors (the interpreter runs Triton on them):
    which kernel each ``cuda_kernel`` setting picks per dtype, what it records, and its error."""
    from dcn_experiments.ops import deform_conv as dc

    tensors, grad_out, (stride, pad, dil) = _problem(c=4, o=4, h=5, w=5)
    geometry = ((stride, stride), (pad, pad), (dil, dil))
    seen = {}
    for setting, dtype, weight_dtype in [
        ("auto", torch.bfloat16, torch.float32),  # autocast: bf16 activations, fp32 parameters
        ("auto", torch.float32, torch.float32),
        ("torchvision", torch.bfloat16, torch.float32),
        ("triton", torch.float32, torch.float32),
        ("triton", torch.float16, torch.float16),
    ]:
        dc.use_cuda_kernel(setting)
        dc.reset_backend_usage()
        t = {k: v.to(weight_dtype if k in ("weight", "bias") else dtype) for k, v in tensors.items()}
        out = dc._cuda_forward(t["input"], t["offset"], t["weight"], t["bias"], t["mask"], geometry, 1)
        grads = dc._cuda_backward(
            grad_out.to(out.dtype), t["input"], t["offset"], t["weight"], t["bias"], t["mask"], geometry, 1, [True] * 5
        )
        ref_out, ref_grads = _float64_truth(tensors, grad_out, (stride, pad, dil), dtype)
        seen[f"{setting}/{str(dtype).removeprefix('torch.')}"] = {
            "backend": dc.backend_usage(),
            "precision": dc.precision_usage(),
            "out_dtype": str(out.dtype).removeprefix("torch."),
            "out": _rel_err(out, ref_out),
            "grads": max(_rel_err(g, ref_grads[k]) for g, k in zip(grads, NAMES, strict=True)),
        }
    dc.use_cuda_kernel("auto")
    return seen


def _child(results_path: str) -> None:
    """Run every check under the interpreter and write the measured errors as JSON."""
    import dcn_experiments.ops.triton_deform as td

    assert td.interpreting(), "the child must run with TRITON_INTERPRET=1"
    fn, results, started = td.deform_conv2d_triton, {}, time.perf_counter()
    for name, case in CASES.items():
        tensors, grad_out, geometry = _problem(**case)
        out, grads = _run(fn, tensors, grad_out, geometry, torch.float32)
        results[f"fp32/{name}"] = _errors(out, grads, *_float64_truth(tensors, grad_out, geometry, torch.float32))
    for name, dtype in HALF.items():
        tensors, grad_out, geometry = _problem(c=8, o=8, h=5, w=6)
        out, grads = _run(fn, tensors, grad_out, geometry, dtype)
        results[name] = _errors(out, grads, *_float64_truth(tensors, grad_out, geometry, dtype))

    # the same problem through the project's CPU op and torchvision, all in float32
    tensors, grad_out, geometry = _problem(c=8, o=6, groups=2, offset_groups=2)
    out, grads = _run(fn, tensors, grad_out, geometry, torch.float32)
    for label, other in (("cpu-op", deform_conv2d), ("torchvision", torchvision.ops.deform_conv2d)):
        other_out, other_grads = _run(other, tensors, grad_out, geometry, torch.float32)
        results[label] = _errors(out, grads, other_out.double(), {k: g.double() for k, g in other_grads.items()})

    tensors, grad_out, geometry = _problem(c=4, o=4, h=5, w=5)
    tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    out, grads = _run(fn, tensors, grad_out, geometry, torch.float32)
    results["channels-last"] = _errors(out, grads, *_float64_truth(tensors, grad_out, geometry, torch.float32))
    results["channels-last"]["formats"] = [
        out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(),
        grads["input"].is_contiguous(memory_format=torch.channels_last) and not grads["input"].is_contiguous(),
    ]

    # the entry points with the C++ extension's argument order, some gradients not asked for
    if cpu_extension_available():
        tensors, grad_out, _ = _problem(c=4, o=4, h=5, w=5, stride=2)
        x, off, w, b, m = (tensors[k].float() for k in NAMES)
        args = (x, w, b, off, m, 2, 2, 1, 1, 1, 1, 1)
        cpp = torch.ops.dcn_experiments_cpu
        entry = {"forward": _rel_err(td.forward(*args), cpp.deform_conv2d_forward(*args).double())}
        bargs = (grad_out.float(), x, w, off, m, 2, 2, 1, 1, 1, 1, 1, True, False, True, False, True)
        ours, theirs = td.backward(*bargs), cpp.deform_conv2d_backward(*bargs)
        entry["none"] = [g is None for g in ours]
        entry["backward"] = [None if a is None else _rel_err(a, c.double()) for a, c in zip(ours, theirs, strict=True)]
        results["entry-points"] = entry

    results["routing"] = _routing()

    tensors, grad_out, geometry = _problem(n=0, h=4, w=4)
    out, grads = _run(fn, tensors, grad_out, geometry, torch.float32)
    results["empty"] = {"shape": list(out.shape), "weight": float(grads["weight"].abs().sum())}
    results["seconds"] = time.perf_counter() - started
    Path(results_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Errors of every case, measured once in a child process running the interpreter."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_float32_values_and_all_gradients_match_float64_reference(measured, case):
    result, tensors = measured[f"fp32/{case}"], _problem(**CASES[case])[0]
    assert result["out"] < 1e-5 and result["out_dtype"] == "torch.float32" and result["out_shape"]
    assert set(result["grads"]) == {k for k, t in tensors.items() if t is not None}
    for name, error in result["grads"].items():
        assert error < 1e-5 and result["grad_shapes"][name], (name, error)
        assert result["grad_dtypes"][name] == "torch.float32", name


@pytest.mark.parametrize("label", ["cpu-op", "torchvision"])
def test_matches_the_cpu_op_and_torchvision(measured, label):
    result = measured[label]
    assert result["out"] < 1e-5, result
    assert set(result["grads"]) == set(NAMES) and max(result["grads"].values()) < 1e-5, result


# Rounding the output once costs 2^-11 (fp16) / 2^-8 (bf16) of its scale; accumulating the 72-term
# sums in the half dtype itself would lose several times that.
@pytest.mark.parametrize("dtype,tolerance", [("float16", 2e-3), ("bfloat16", 1.5e-2)])
def test_half_precision_inputs_accumulate_in_float32(measured, dtype, tolerance):
    result = measured[dtype]
    assert result["out_dtype"] == f"torch.{dtype}" and result["out"] < tolerance, result
    assert set(result["grads"]) == set(NAMES)
    for name, error in result["grads"].items():
        assert result["grad_dtypes"][name] == f"torch.{dtype}" and error < tolerance, (name, error)


def test_channels_last_in_channels_last_out(measured):
    result = measured["channels-last"]
    assert result["formats"] == [True, True]
    assert result["out"] < 1e-5 and result["grads"]["input"] < 1e-5


def test_entry_points_take_the_cpu_extensions_arguments(measured):
    if "entry-points" not in measured:
        pytest.skip("the C++ CPU extension could not be built")
    result = measured["entry-points"]
    assert result["forward"] < 1e-6
    assert result["none"] == [False, True, False, True, False]  # offset and weight not asked for
    assert all(error < 1e-5 for error in result["backward"] if error is not None), result


# setting/input dtype -> (kernel, dtype it computes in, error limit); the dtypes of the output follow
# the kernel: torchvision computes bf16 inputs in fp32 and hands back fp32 to the op, which casts.
ROUTES = {
    "auto/bfloat16": ("triton-cuda", "bfloat16", 3e-2),
    "auto/float32": ("torchvision-cuda", "float32", 1e-5),
    "torchvision/bfloat16": ("torchvision-cuda", "float32", 3e-2),
    "triton/float32": ("triton-cuda", "float32", 1e-5),
    "triton/float16": ("triton-cuda", "float16", 5e-3),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_cuda_dispatch_picks_the_kernel_per_setting_and_dtype(measured, route):
    backend, precision, limit = ROUTES[route]
    result = measured["routing"][route]
    assert result["backend"] == {backend: 1} and result["precision"] == {precision: 1}
    assert result["out"] < limit and result["grads"] < limit, result


def test_empty_batch(measured):
    assert measured["empty"] == {"shape": [0, 4, 4, 4], "weight": 0.0}


def test_imports_and_reports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _load_copy("_triton_deform_without_triton")
    assert not module.triton_available() and "triton" in module.TRITON_IMPORT_ERROR.lower()
    x = torch.zeros(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.forward(x, torch.zeros(1, 1, 3, 3), None, torch.zeros(1, 18, 1, 1), None, 1, 1, 0, 0, 1, 1, 1)


if __name__ == "__main__":
    _child(sys.argv[1])


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_cuda_triton_matches_torchvision_values_and_gradients() -> None:
    from dcn_experiments.ops.triton_deform import deform_conv2d_triton

    tensors, grad_out, geometry = _problem(n=3, c=16, o=24, h=11, w=9, groups=2, offset_groups=2)
    cuda = {k: None if t is None else t.float().cuda() for k, t in tensors.items()}
    out, grads = _run(deform_conv2d_triton, cuda, grad_out.cuda(), geometry, torch.float32)
    tv_out, tv_grads = _run(torchvision.ops.deform_conv2d, cuda, grad_out.cuda(), geometry, torch.float32)
    torch.testing.assert_close(out, tv_out, rtol=1e-4, atol=1e-4)
    for name in NAMES:
        torch.testing.assert_close(grads[name], tv_grads[name], rtol=1e-4, atol=1e-4, msg=name)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_op_under_autocast_runs_the_chosen_kernel(dtype) -> None:
    """A deformable layer trained under autocast: auto runs Triton in bf16 (torchvision in fp16), and
    the gradients of the half-precision run follow the fp32 ones."""
    from dcn_experiments import ops
    from dcn_experiments.models import DeformConv2d

    torch.manual_seed(0)
    layer = DeformConv2d(16, 16, 3, padding=1, cuda_kernel="auto").cuda()
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.05)
    x = torch.randn(4, 16, 12, 12, device="cuda")
    reference = layer(x).float()
    try:
        ops.reset_backend_usage()
        with torch.autocast("cuda", dtype=dtype):
            out = layer(x.to(dtype))
        out.float().sum().backward()
    finally:
        ops.use_cuda_kernel("auto")
    expected = {torch.bfloat16: ("triton-cuda", "bfloat16"), torch.float16: ("torchvision-cuda", "float32")}[dtype]
    assert ops.backend_usage() == {expected[0]: 1}
    assert ops.precision_usage() == {expected[1]: 1}
    assert _rel_err(out.float(), reference.double()) < 3e-2
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def _compile_for_gpu(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, arch: int = 90):
    """Compile a kernel to a cubin for an NVIDIA ``arch`` on this (GPU-less) machine."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_compile_for_sm90_without_register_spills(dtype, tmp_path):
    """What the interpreter cannot check: Triton's GPU compiler and ptxas accept every kernel with the
    tile sizes the op uses on CUDA (a ResNet stage-2 layer), and no thread spills registers."""
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("Triton's bundled ptxas is missing")
    td = triton_deform_module  # imported here without TRITON_INTERPRET: the GPU tile sizes
    blocks = td._blocks(128, 128, dtype)
    element = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    flags = {"UPCAST": False, "PRECISION": "tf32x3" if dtype == torch.float32 else "tf32"}
    tile = {"BLOCK_M": blocks["BLOCK_M"], "BLOCK_N": blocks["BLOCK_N"], "BLOCK_K": blocks["BLOCK_K"]}
    data_tile = {"BLOCK_M": blocks["BLOCK_M"], "BLOCK_O": blocks["BLOCK_O"], "BLOCK_K": blocks["BLOCK_K_DATA"]}
    inputs = {n: element for n in ("x_ptr", "off_ptr", "msk_ptr", "w_ptr", "b_ptr", "out_ptr", "go_ptr")}
    fp32 = {n: "*fp32" for n in ("part_ptr", "gx_ptr", "goff_ptr", "gmsk_ptr")}
    kernels = {
        "forward": (td._forward_kernel, {"HAS_MASK": True, "HAS_BIAS": True, **flags, **tile}),
        "grad_weight": (td._grad_weight_kernel, {"HAS_MASK": True, **flags, **tile}),
        "grad_data": (
            td._grad_data_kernel,
            {"NEED_INPUT": True, "NEED_OFFSET": True, "NEED_MASK": True, "HAS_MASK": True, **flags, **data_tile},
        ),
    }
    for name, (kernel, constexprs) in kernels.items():
        compiled = _compile_for_gpu(kernel, inputs | fp32, constexprs, blocks["num_warps"])
        ptx = tmp_path / f"{name}.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run(
            [str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(tmp_path / f"{name}.cubin")],
            capture_output=True,
            text=True,
        )
        assert report.returncode == 0, report.stderr
        ptxas_info = report.stdout + report.stderr
        assert re.search(r"\b0 bytes spill stores", ptxas_info), (name, ptxas_info)
