"""``deform_conv2d``: torchvision's deformable convolution signature and results, fast on CPU.

Three implementations sit behind the one function:

* ``cpu-extension``: a C++ kernel (``deform_conv2d_cpu.cpp``) built on first use with
  ``torch.utils.cpp_extension`` and cached; float32/float64 on CPU.
* ``torchvision``: ``torchvision.ops.deform_conv2d``, used on CUDA (its kernel is the fastest one
  there and has autocast support).
* ``reference``: vectorised PyTorch (gathers + one matmul per group), differentiable by autograd.
  Used when the extension cannot be built (with a warning), for other dtypes, and in tests.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

log = logging.getLogger(__name__)

_EXTENSION_SOURCE = Path(__file__).with_name("deform_conv2d_cpu.cpp")
_extension_lock = threading.Lock()
_extension_state: dict[str, object] = {}
# Which implementation served each call (``backend_usage``): runs record the kernel that really ran.
CPP_CPU, PYTORCH_FALLBACK, TORCHVISION_CUDA = "cpp-cpu", "pytorch-fallback", "torchvision-cuda"
_backend_calls: Counter[str] = Counter()
# The dtype each call really computed in (``precision_usage``): under autocast a kernel may compute in
# float32 while the regular convolutions run in bfloat16, which changes what a time ratio means.
_precision_calls: Counter[str] = Counter()


def backend_usage() -> dict[str, int]:
    """Calls of :func:`deform_conv2d` per implementation since the last :func:`reset_backend_usage`."""
    return dict(_backend_calls)


def precision_usage() -> dict[str, int]:
    """Calls of :func:`deform_conv2d` per compute dtype (``"float32"``, ...) since the last reset."""
    return dict(_precision_calls)


def reset_backend_usage() -> None:
    """Start counting :func:`backend_usage` and :func:`precision_usage` afresh."""
    _backend_calls.clear()
    _precision_calls.clear()


def _count_call(backend: str, compute_dtype: torch.dtype) -> None:
    _backend_calls[backend] += 1
    _precision_calls[str(compute_dtype).removeprefix("torch.")] += 1


CACHE_ROOT = Path.home() / ".cache" / "dcn-experiments"  # the project's one cache root (data, kernels)
_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_signature(cpuinfo: str | None = None) -> str:
    """A short hash of what ``-march=native`` compiles for: machine, CPU model and ISA flags
    (read from ``/proc/cpuinfo`` unless ``cpuinfo`` gives its text).

    Part of the kernel cache key, so a home directory shared by machines with different CPUs (a
    cluster) never hands one of them a binary built for another (which would die with SIGILL).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = platform.processor()
    facts = [platform.machine(), " ".join(_COMPILE_FLAGS)]
    for line in cpuinfo.splitlines():
        if line.startswith(("model name", "flags", "Features", "CPU part")):
            facts.append(" ".join(line.split(":", 1)[-1].split()))
            if len(facts) >= 5:  # the first processor's lines are enough
                break
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:12]


def kernel_build_dir() -> Path:
    """Where the C++ kernel is built and cached: ``$DCN_EXTENSION_DIR``, else
    ``~/.cache/dcn-experiments/kernels/torch-<version>-<machine>-<cpu signature>``."""
    explicit = os.environ.get("DCN_EXTENSION_DIR")
    if explicit:
        return Path(explicit)
    return CACHE_ROOT / "kernels" / f"torch-{torch.__version__}-{platform.machine()}-{cpu_signature()}"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_and_load(build_dir: Path) -> None:
    """Compile (or reuse) and load the kernel under an exclusive lock on the build folder.

    The lock (``flock``, released by the OS even when its holder is killed) makes concurrent sweep
    jobs build one after the other; the later ones load the finished binary. Each successful load
    records the binary's SHA-256: a cached binary that does not match it (truncated by a full disk,
    half-written by a killed build) is never loaded, since dlopen of such a file can kill the
    process (SIGBUS); the folder is wiped and the kernel rebuilt.
    """
    from torch.utils.cpp_extension import load

    name = "dcn_experiments_cpu"
    binary, digest = build_dir / f"{name}.so", build_dir / f"{name}.so.sha256"
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists() and (not digest.is_file() or digest.read_text().strip() != _file_digest(binary)):
            log.warning("the cached deformable-conv kernel in %s is incomplete or corrupt; rebuilding it", build_dir)
            for stale in build_dir.iterdir():
                if stale.name != ".build.lock":
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        # cpp_extension's own lock file: under our lock nobody else is building, so one that
        # exists was left by a killed build and would make load() wait forever.
        (build_dir / "lock").unlink(missing_ok=True)
        load(
            name=name,
            sources=[str(_EXTENSION_SOURCE)],
            extra_cflags=_COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        digest.write_text(_file_digest(binary))


def _load_cpu_extension() -> bool:
    """Build (once per machine, cached) and load the C++ CPU kernel; False if it cannot be built."""
    if "loaded" in _extension_state:
        return bool(_extension_state["loaded"])
    with _extension_lock:
        if "loaded" in _extension_state:
            return bool(_extension_state["loaded"])
        if os.environ.get("DCN_DISABLE_CPU_EXTENSION") == "1":
            _extension_state["loaded"] = False
            return False
        try:
            # cpp_extension logs a CUDA_HOME notice on import that means nothing for a CPU build.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            _build_and_load(kernel_build_dir())
            _extension_state["loaded"] = True
        except Exception as error:
            message = (
                "dcn_experiments: could not build the C++ deformable-conv kernel "
                f"({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
                "falling back to the slower pure-PyTorch implementation. Install gcc/g++ and ninja to fix."
            )
            log.warning("%s", message)  # into the run's log, not only on stderr
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            _extension_state["loaded"] = False
    return bool(_extension_state["loaded"])


def cpu_extension_available() -> bool:
    """Whether the compiled CPU kernel is in use (building it on first call)."""
    return _load_cpu_extension()


def _check_arguments(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> int:
    """Validate shapes like torchvision does; return the number of offset groups."""
    for name, t, dims in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4)):
        if t.dim() != dims:
            raise RuntimeError(f"deform_conv2d: {name} must be a {dims}-D tensor, got shape {tuple(t.shape)}")
    if mask is not None and mask.dim() != 4:
        raise RuntimeError(f"deform_conv2d: mask must be a 4-D tensor, got shape {tuple(mask.shape)}")
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise RuntimeError(
            f"deform_conv2d: stride and dilation must be > 0 and padding >= 0, "
            f"got stride={stride}, padding={padding}, dilation={dilation}"
        )
    n, c, h, w = input.shape
    out_c, c_per_group, kh, kw = weight.shape
    if c_per_group == 0 or c % c_per_group != 0:
        raise RuntimeError(f"deform_conv2d: input channels ({c}) must be divisible by weight.shape[1] ({c_per_group})")
    groups = c // c_per_group
    if out_c % groups != 0:
        raise RuntimeError(f"deform_conv2d: weight.shape[0] ({out_c}) must be divisible by the groups ({groups})")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise RuntimeError(
            "deform_conv2d: the shape of the offset tensor at dimension 1 is not valid. It should be a "
            f"multiple of 2 * weight.size[2] * weight.size[3].\nGot offset.shape[1]={offset.shape[1]}, "
            f"while 2 * weight.size[2] * weight.size[3]={2 * taps}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise RuntimeError(
            f"deform_conv2d: input channels ({c}) must be divisible by the offset groups ({offset_groups})"
        )
    if offset.shape[0] != n:
        raise RuntimeError(f"deform_conv2d: offset batch ({offset.shape[0]}) must equal input batch ({n})")
    out_h = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_w = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise RuntimeError(
            f"deform_conv2d: calculated output size is too small ({out_h}x{out_w}) for input {h}x{w}, "
            f"kernel {kh}x{kw}, stride {stride}, padding {padding}, dilation {dilation}"
        )
    if tuple(offset.shape[2:]) != (out_h, out_w):
        raise RuntimeError(
            f"deform_conv2d: offset spatial size {tuple(offset.shape[2:])} must equal the output size {(out_h, out_w)}"
        )
    if mask is not None and (
        mask.shape[0] != n or mask.shape[1] != offset_groups * taps or tuple(mask.shape[2:]) != (out_h, out_w)
    ):
        raise RuntimeError(
            f"deform_conv2d: mask shape {tuple(mask.shape)} must be "
            f"{(n, offset_groups * taps, out_h, out_w)} (batch, offset_groups * kh * kw, out_h, out_w)"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_c):
        raise RuntimeError(f"deform_conv2d: bias must have shape ({out_c},), got {tuple(bias.shape)}")
    return offset_groups


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """``channels_last`` for a tensor laid out NHWC, else ``contiguous_format`` (ATen's suggestion)."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution in plain PyTorch ops (autograd-differentiable, any dtype/device)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    offset_groups = _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    n, c, h, w = input.shape
    out_c, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    out_h, out_w = offset.shape[2:]
    taps, positions = kh * kw, out_h * out_w
    dev, dt = input.device, input.dtype

    rows = torch.arange(out_h, device=dev, dtype=dt) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=dev, dtype=dt) * stride[1] - padding[1]
    tap_y = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
    base_y = tap_y.view(taps, 1, 1) + rows.view(1, out_h, 1)  # (K, Ho, 1)
    base_x = tap_x.view(taps, 1, 1) + cols.view(1, 1, out_w)  # (K, 1, Wo)

    off = offset.view(n, offset_groups, taps, 2, out_h, out_w)
    y = base_y + off[:, :, :, 0]  # (N, G, K, Ho, Wo)
    x = base_x + off[:, :, :, 1]
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()

    flat = input.reshape(n, offset_groups, c // offset_groups, h * w)
    sampled = input.new_zeros(n, offset_groups, c // offset_groups, taps * positions)
    for dy, dx, wy, wx in ((0, 0, 1 - ly, 1 - lx), (0, 1, 1 - ly, lx), (1, 0, ly, 1 - lx), (1, 1, ly, lx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(n, offset_groups, 1, taps * positions)
        corner = torch.gather(flat, 3, index.expand(-1, -1, c // offset_groups, -1))
        weight_ = (wy * wx * inside).view(n, offset_groups, 1, taps * positions)
        sampled = sampled + corner * weight_
    if mask is not None:
        sampled = sampled * mask.view(n, offset_groups, 1, taps * positions)
    columns = sampled.view(n, groups, c_per_group, taps, positions).reshape(n, groups, c_per_group * taps, positions)
    kernel = weight.view(groups, out_c // groups, c_per_group * taps)
    out = torch.einsum("gok,ngkl->ngol", kernel, columns).reshape(n, out_c, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=memory_format_of(input))


class _DeformConv2dCPU(torch.autograd.Function):
    """Autograd wrapper around the C++ CPU forward/backward kernels."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation, offset_groups):
        ctx.geometry = (stride, padding, dilation, offset_groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, offset, weight, mask)
        return torch.ops.dcn_experiments_cpu.deform_conv2d_forward(
            input,
            weight,
            bias,
            offset,
            mask,
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            offset_groups,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation, offset_groups = ctx.geometry
        need = ctx.needs_input_grad
        grad_input, grad_offset, grad_mask, grad_weight, grad_bias = (
            torch.ops.dcn_experiments_cpu.deform_conv2d_backward(
                grad_out,
                input,
                weight,
                offset,
                mask,
                stride[0],
                stride[1],
                padding[0],
                padding[1],
                dilation[0],
                dilation[1],
                offset_groups,
                need[0],
                need[1],
                need[4] and mask is not None,
                need[2],
                need[3] and ctx.has_bias,
            )
        )
        return (
            grad_input if need[0] else None,
            grad_offset if need[1] else None,
            grad_weight if need[2] else None,
            grad_bias if need[3] and ctx.has_bias else None,
            grad_mask if need[4] and mask is not None else None,
            None,
            None,
            None,
            None,
        )


def _torchvision_deform_conv2d() -> object | None:
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except Exception:
        return None
    return tv_deform_conv2d


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution (DCN v1 when ``mask`` is None, v2 otherwise).

    Same signature, offset layout (``[dy, dx]`` per kernel tap and offset group) and results as
    ``torchvision.ops.deform_conv2d``; differentiable w.r.t. input, offset, mask, weight and bias.
    The output (and the input's gradient) has the input's memory format, as ``F.conv2d``'s does:
    NCHW in, NCHW out; channels-last in, channels-last out.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if input.device.type == "cuda":
        tv_op = _torchvision_deform_conv2d()
        if tv_op is not None:
            # torchvision's autocast rule runs the op in float32; it has no bfloat16 kernel either.
            autocast_on = torch.is_autocast_enabled("cuda")
            _count_call(
                TORCHVISION_CUDA,
                torch.float32 if autocast_on or input.dtype == torch.bfloat16 else input.dtype,
            )
            out = tv_op(input, offset, weight, bias, stride, padding, dilation, mask)
            return out.contiguous(memory_format=memory_format_of(input))
        _count_call(PYTORCH_FALLBACK, input.dtype)
        return deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)

    offset_groups = _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    if input.device.type != "cpu" or any(t.device != input.device for t in tensors):
        _count_call(PYTORCH_FALLBACK, input.dtype)
        return deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)
    compute_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not all(t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for t in tensors):
        raise RuntimeError(f"deform_conv2d: expected floating-point tensors, got {[t.dtype for t in tensors]}")
    if not _load_cpu_extension():
        _count_call(PYTORCH_FALLBACK, input.dtype)
        return deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation, mask)
    _count_call(CPP_CPU, compute_dtype)
    cast = [None if t is None else t.to(compute_dtype) for t in (input, offset, weight, bias, mask)]
    out = _DeformConv2dCPU.apply(cast[0], cast[1], cast[2], cast[3], cast[4], stride, padding, dilation, offset_groups)
    # Under autocast (or with half-precision inputs) hand back the input's dtype, like torchvision.
    return out if input.dtype == compute_dtype else out.to(input.dtype)
