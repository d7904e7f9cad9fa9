"""``deform_conv2d``: torchvision's deformable convolution signature and results, as a PyTorch custom op.

``torch.ops.dcn_experiments.deform_conv2d`` (and ``...deform_conv2d_backward``) are registered
through ``torch.library``: a schema, a default kernel (which serves CPU tensors until the C++ library
is loaded, and the reference elsewhere), a CUDA kernel, a fake kernel (shapes only, for
``torch.compile`` / ``torch.export``) and autograd. Behind the kernels sit three implementations:

* ``cpu-extension``: a C++ kernel (``deform_conv2d_cpu.cpp``) built on first use with
  ``torch.utils.cpp_extension`` and cached. Once loaded, the library also serves the op itself for
  CPU tensors (``deform_conv2d_op.cpp``: CPU kernels and autograd in C++, taking precedence over the
  Python ones below, with the same checks and results), which saves a trip through Python per call.
* ``torchvision``: ``torchvision.ops.deform_conv2d``'s kernels on CUDA (the single CUDA dispatch
  point is :func:`_cuda_forward` / :func:`_cuda_backward`; other kernels plug in with
  :func:`register_cuda_kernel`).
* ``triton``: ``triton_deform.py`` on CUDA, fp32/fp16/bf16 (registered on first use). Which CUDA
  kernel runs is :func:`use_cuda_kernel`'s setting; ``"auto"`` (default) takes Triton for bf16
  inputs, which torchvision has no kernel for, and torchvision otherwise.
* ``reference``: vectorised PyTorch (gathers + one matmul per group). Used on CPU when the extension
  cannot be built (with a warning) and on other devices.

Precision (autocast): the op is deliberately not in autocast's cast lists; it accepts any mix of
floating dtypes and computes in float64 if any input is float64, else float32 (on CUDA float16
when every input is float16), and returns the input's dtype, like torchvision's autocast rule;
the Triton kernel computes in the input's dtype (fp32, fp16 or bf16), as a convolution under autocast.
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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

log = logging.getLogger(__name__)

# The raw kernels, and the op's CPU and autograd kernels in C++ (which reach the raw ones through the dispatcher).
_EXTENSION_SOURCES = (
    Path(__file__).with_name("deform_conv2d_cpu.cpp"),
    Path(__file__).with_name("deform_conv2d_op.cpp"),
)
_extension_lock = threading.Lock()
_extension_state: dict[str, object] = {}
# Which implementation served each call (``backend_usage``): runs record the kernel that really ran.
CPP_CPU, PYTORCH_FALLBACK, TORCHVISION_CUDA = "cpp-cpu", "pytorch-fallback", "torchvision-cuda"
_backend_calls: Counter[str] = Counter()
# The dtype each call really computed in (``precision_usage``): under autocast a kernel may compute in
# float32 while the regular convolutions run in bfloat16, which changes what a time ratio means.
_precision_calls: Counter[str] = Counter()


def _native_calls() -> dict[str, int]:
    """Calls served by the C++ library's own CPU kernel of the op (it counts them), per compute dtype."""
    if not _extension_state.get("loaded"):
        return {}
    float32, float64 = torch.ops.dcn_experiments_cpu.public_op_calls()
    return {dtype: n for dtype, n in (("float32", float32), ("float64", float64)) if n}


def backend_usage() -> dict[str, int]:
    """Calls of :func:`deform_conv2d` per implementation since the last :func:`reset_backend_usage`."""
    usage = _backend_calls.copy()
    usage[CPP_CPU] += sum(_native_calls().values())
    return {name: n for name, n in usage.items() if n}


def precision_usage() -> dict[str, int]:
    """Calls of :func:`deform_conv2d` per compute dtype (``"float32"``, ...) since the last reset."""
    return dict(_precision_calls + Counter(_native_calls()))


def reset_backend_usage() -> None:
    """Start counting :func:`backend_usage` and :func:`precision_usage` afresh."""
    _backend_calls.clear()
    _precision_calls.clear()
    if _extension_state.get("loaded"):
        torch.ops.dcn_experiments_cpu.reset_public_op_calls()


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
            sources=[str(source) for source in _EXTENSION_SOURCES],
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
    if c == 0:
        raise RuntimeError(f"deform_conv2d: input must have at least one channel, got shape {tuple(input.shape)}")
    if c_per_group == 0 or c % c_per_group != 0:
        raise RuntimeError(f"deform_conv2d: input channels ({c}) must be divisible by weight.shape[1] ({c_per_group})")
    groups = c // c_per_group
    if out_c % groups != 0:
        raise RuntimeError(f"deform_conv2d: weight.shape[0] ({out_c}) must be divisible by the groups ({groups})")
    taps = kh * kw
    if offset.shape[1] == 0 or taps == 0 or offset.shape[1] % (2 * taps) != 0:
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


def offset_gradient_format_of(tensor: Tensor) -> torch.memory_format:
    """The memory format of an offset or mask tensor's gradient: ``channels_last`` also for a tensor
    whose channels are innermost without being a whole channels-last tensor, such as the offsets and
    mask that a channels-last model's DCNv2 layer splits from one prediction (their gradients then
    join the prediction's channels-last gradient without a copy). The C++ kernel's ``gradient_like``
    follows the same rule."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.shape[1] > 1 and tensor.stride(1) == 1:
        return torch.channels_last
    return memory_format_of(tensor)


# The memory format of each gradient (input, offset, weight, bias, mask) given its tensor.
_GRADIENT_FORMATS = (memory_format_of, offset_gradient_format_of, memory_format_of, memory_format_of,
                     offset_gradient_format_of)  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# The operator: ``torch.ops.dcn_experiments.deform_conv2d`` and its backward, both custom ops, so
# that torch.compile and torch.export see one opaque node each instead of tracing into a library.

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # stride, padding, dilation
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # input, offset, weight, bias, mask
CudaForward = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", Geometry, int], Tensor]
CudaBackward = Callable[
    [Tensor, Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", Geometry, int, tuple[bool, ...]],
    tuple["Tensor | None", ...],
]
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Geometry:
    return tuple(stride), tuple(padding), tuple(dilation)  # type: ignore[return-value]


def _compute_dtype(tensors: Sequence[Tensor], half_ok: bool) -> torch.dtype:
    """float64 if any tensor is; the common dtype if all share one the kernel has (``half_ok``:
    float16 too); else float32 (bfloat16/float16 inputs, mixed dtypes under autocast)."""
    if not all(t.dtype in _FLOAT_DTYPES for t in tensors):
        raise RuntimeError(f"deform_conv2d: expected floating-point tensors, got {[t.dtype for t in tensors]}")
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes:
        return torch.float64
    if len(dtypes) == 1 and (dtypes == {torch.float32} or (half_ok and dtypes == {torch.float16})):
        return dtypes.pop()
    return torch.float32


def _cast(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    # Tensor.to is a dispatcher round trip even when nothing changes: about 1.5 us per tensor,
    # which batch-1 calls of small layers notice.
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def _grad_like(grad: Tensor | None, like: Tensor | None, needed: bool, layout: Callable, input: Tensor) -> Tensor:
    """A gradient in ``like``'s dtype and memory format ``layout(like)``, or an empty placeholder
    where none was asked for (a custom op's outputs cannot be None; ``input``'s kind for absent tensors)."""
    if not needed or like is None or grad is None:
        return like.new_empty(0) if like is not None else input.new_empty(0)
    return grad.to(like.dtype).contiguous(memory_format=layout(like))


def _needed(output_mask: Sequence[bool], bias: Tensor | None, mask: Tensor | None) -> tuple[bool, ...]:
    if len(output_mask) != 5:
        raise RuntimeError(f"deform_conv2d_backward: output_mask must have 5 values, got {len(output_mask)}")
    need = tuple(bool(b) for b in output_mask)
    return need[0], need[1], need[2], need[3] and bias is not None, need[4] and mask is not None


# --- CPU: the C++ extension, or the pure-PyTorch reference when it cannot be built --------------


def _cpu_forward(input, offset, weight, bias, mask, geometry: Geometry, offset_groups: int) -> Tensor:
    (sh, sw), (ph, pw), (dh, dw) = geometry
    return torch.ops.dcn_experiments_cpu.deform_conv2d_forward(
        input, weight, bias, offset, mask, sh, sw, ph, pw, dh, dw, offset_groups
    )


def _cpu_backward(grad_out, input, offset, weight, bias, mask, geometry: Geometry, offset_groups: int, need):
    (sh, sw), (ph, pw), (dh, dw) = geometry
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = torch.ops.dcn_experiments_cpu.deform_conv2d_backward(
        grad_out, input, weight, offset, mask, sh, sw, ph, pw, dh, dw, offset_groups,
        need[0], need[1], need[4], need[2], need[3],
    )  # fmt: skip
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _reference_backward(grad_out, input, offset, weight, bias, mask, geometry: Geometry, need) -> list:
    """Gradients of the reference implementation. Autograd is switched off inside an op's kernel;
    ``torch.func.vjp`` still differentiates there."""
    stride, padding, dilation = geometry
    primals = [t for t, n in zip((input, offset, weight, bias, mask), need, strict=True) if n]
    fixed = (input, offset, weight, bias, mask)

    def forward(*wanted: Tensor) -> Tensor:
        values = iter(wanted)
        args = [next(values) if n else t for t, n in zip(fixed, need, strict=True)]
        return deform_conv2d_reference(args[0], args[1], args[2], args[3], stride, padding, dilation, args[4])

    if not primals:
        return [None] * 5
    _, vjp = torch.func.vjp(forward, *primals)
    grads = iter(vjp(grad_out))
    return [next(grads) if n else None for n in need]


# --- CUDA: the single dispatch point for the CUDA kernel (torchvision, Triton) --------------------


def _torchvision_ops():
    """``torch.ops.torchvision``, whose operators exist only once torchvision has been imported."""
    import torchvision  # noqa: F401

    return torch.ops.torchvision


def _torchvision_forward(input, offset, weight, bias, mask, geometry: Geometry, offset_groups: int) -> Tensor:
    (sh, sw), (ph, pw), (dh, dw) = geometry
    groups = input.shape[1] // weight.shape[1]
    use_mask = mask is not None
    return _torchvision_ops().deform_conv2d(
        input, weight, offset,
        mask if use_mask else input.new_zeros((input.shape[0], 1)),  # shape torchvision checks
        bias if bias is not None else input.new_zeros(weight.shape[0]),
        sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask,
    )  # fmt: skip


def _torchvision_backward(grad_out, input, offset, weight, bias, mask, geometry, offset_groups: int, need):
    (sh, sw), (ph, pw), (dh, dw) = geometry
    groups = input.shape[1] // weight.shape[1]
    use_mask = mask is not None
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = _torchvision_ops()._deform_conv2d_backward(
        grad_out.contiguous(), input, weight, offset,
        mask if use_mask else input.new_zeros((input.shape[0], 1)),  # shape torchvision checks
        bias if bias is not None else input.new_zeros(weight.shape[0]),
        sh, sw, ph, pw, dh, dw, groups, offset_groups, use_mask,
    )  # fmt: skip
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


# name -> (backend label for backend_usage, forward, backward, float16 kernel?). A CUDA kernel
# takes (input, offset, weight, bias, mask, (stride, padding, dilation), offset_groups) in one
# compute dtype and returns the output; its backward takes grad_out first and ``need`` (five
# bools: input, offset, weight, bias, mask) last and returns those five gradients (None allowed).
_CUDA_KERNELS: dict[str, tuple[str, CudaForward, CudaBackward, bool]] = {
    "torchvision": (TORCHVISION_CUDA, _torchvision_forward, _torchvision_backward, True),
}
# The setting (``conv.cuda_kernel``): a registered kernel, or "auto" = per call by the input's dtype.
CUDA_KERNEL_CHOICES = ("auto", "torchvision", "triton")
_cuda_kernel_choice = ["auto"]
_triton_warned: list[bool] = []  # the missing-Triton warning is logged once per process


def register_cuda_kernel(
    name: str, backend: str, forward: CudaForward, backward: CudaBackward, float16: bool = False
) -> None:
    """Make ``name`` a CUDA implementation of the op (``backend`` is its :func:`backend_usage` label)."""
    if name in _CUDA_KERNELS:
        raise ValueError(f"a CUDA kernel named {name!r} is already registered")
    _CUDA_KERNELS[name] = (backend, forward, backward, float16)


def _triton_registered() -> bool:
    """Register the Triton kernel (``triton_deform``) on first need; False when Triton cannot be imported."""
    if "triton" in _CUDA_KERNELS:
        return True
    from dcn_experiments.ops import triton_deform

    if not triton_deform.triton_available():
        if not _triton_warned:
            _triton_warned.append(True)
            log.warning(
                "deform_conv2d: Triton is not available (%s); bfloat16 CUDA calls run torchvision's kernel in float32",
                triton_deform.TRITON_IMPORT_ERROR,
            )
        return False
    register_cuda_kernel(
        "triton", triton_deform.TRITON_CUDA, triton_deform.cuda_forward, triton_deform.cuda_backward, float16=True
    )
    return True


def use_cuda_kernel(name: str) -> None:
    """Serve CUDA calls of the op with kernel ``name``: ``"auto"`` (default; per call, torchvision for
    fp32/fp16 inputs and Triton for bf16, which torchvision has no kernel for), ``"torchvision"``,
    ``"triton"`` or another registered kernel. ValueError if unknown or Triton is missing."""
    if name == "triton" and not _triton_registered():
        from dcn_experiments.ops.triton_deform import TRITON_IMPORT_ERROR

        raise ValueError(f"the Triton kernel needs triton, which cannot be imported ({TRITON_IMPORT_ERROR})")
    if name != "auto" and name not in _CUDA_KERNELS:
        choices = ", ".join(["auto", *sorted(_CUDA_KERNELS)])
        raise ValueError(f"unknown CUDA kernel {name!r}; choose one of {choices}")
    _cuda_kernel_choice[0] = name


def cuda_kernel() -> str:
    """The CUDA kernel setting (``"auto"`` or a registered kernel's name)."""
    return _cuda_kernel_choice[0]


def _kernel_for(input: Tensor, tensors: Sequence[Tensor]) -> tuple[str, torch.dtype]:
    """The registered kernel serving this call and the dtype it computes in."""
    name = _cuda_kernel_choice[0]
    if name == "auto":  # until a GPU measurement says otherwise: see the README's GPU table
        name = "triton" if input.dtype == torch.bfloat16 and _triton_registered() else "torchvision"
    if name == "triton":
        if input.dtype != torch.float64:
            # Triton computes in the activations' dtype, as a convolution under autocast does.
            return name, input.dtype
        name = "torchvision"  # no float64 Triton path; backend_usage records torchvision
    return name, _compute_dtype(tensors, half_ok=_CUDA_KERNELS[name][3])


def _cuda_forward(input, offset, weight, bias, mask, geometry: Geometry, offset_groups: int) -> Tensor:
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    name, dtype = _kernel_for(input, tensors)
    backend, forward, _, _ = _CUDA_KERNELS[name]
    _count_call(backend, dtype)
    cast = _cast((input, offset, weight, bias, mask), dtype)
    return forward(*cast, geometry, offset_groups)


def _cuda_backward(grad_out, input, offset, weight, bias, mask, geometry: Geometry, offset_groups: int, need):
    tensors = [t for t in (grad_out, input, offset, weight, bias, mask) if t is not None]
    name, dtype = _kernel_for(input, tensors)
    backward = _CUDA_KERNELS[name][2]
    return backward(*_cast((grad_out, input, offset, weight, bias, mask), dtype), geometry, offset_groups, need)


# --- the op and its backward ---------------------------------------------------------------------


def _validated(input, offset, weight, bias, mask, stride, padding, dilation) -> tuple[Geometry, int]:
    geometry = _geometry(stride, padding, dilation)
    for name, values in zip(("stride", "padding", "dilation"), geometry, strict=True):
        if len(values) != 2:
            raise RuntimeError(f"deform_conv2d: {name} must have two values (height, width), got {list(values)}")
    offset_groups = _check_arguments(input, offset, weight, bias, *geometry, mask)
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    if any(t.device != input.device for t in tensors):
        raise RuntimeError(f"deform_conv2d: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    _compute_dtype(tensors, half_ok=True)  # floating point only
    return geometry, offset_groups


@torch.library.custom_op("dcn_experiments::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Deformable convolution. This body (CompositeExplicitAutograd) serves CPU calls until the C++
    library is loaded, whose own CPU kernel then takes precedence (deform_conv2d_op.cpp), and devices
    without a kernel of their own (reference)."""
    if input.device.type == "cpu":
        return _deform_conv2d_cpu(input, offset, weight, bias, mask, stride, padding, dilation)
    geometry, _ = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    _count_call(PYTORCH_FALLBACK, input.dtype)
    return deform_conv2d_reference(input, offset, weight, bias, *geometry, mask)


def _deform_conv2d_cpu(input, offset, weight, bias, mask, stride, padding, dilation) -> Tensor:
    geometry, offset_groups = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    if not _load_cpu_extension():
        _count_call(PYTORCH_FALLBACK, input.dtype)
        return deform_conv2d_reference(input, offset, weight, bias, *geometry, mask)
    tensors = [t for t in (input, offset, weight, bias, mask) if t is not None]
    dtype = _compute_dtype(tensors, half_ok=False)
    _count_call(CPP_CPU, dtype)
    cast = _cast((input, offset, weight, bias, mask), dtype)
    out = _cpu_forward(*cast, geometry, offset_groups)
    # Half-precision inputs (autocast) get their own dtype back, as torchvision's autocast rule does.
    if out.dtype != input.dtype:
        out = out.to(input.dtype)
    return out.contiguous(memory_format=memory_format_of(input))


@_deform_conv2d_op.register_kernel("cuda")
def _deform_conv2d_cuda(input, offset, weight, bias, mask, stride, padding, dilation) -> Tensor:
    geometry, offset_groups = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    out = _cuda_forward(input, offset, weight, bias, mask, geometry, offset_groups)
    return out.to(input.dtype).contiguous(memory_format=memory_format_of(input))


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride, padding, dilation) -> Tensor:
    _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    shape = (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return input.new_empty(shape).contiguous(memory_format=memory_format_of(input))


@torch.library.custom_op("dcn_experiments::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (input, offset, weight, bias, mask); an empty tensor where ``output_mask`` is False.
    Like the forward's, this body serves CPU calls until the C++ library's own kernel takes over."""
    if input.device.type == "cpu":
        return _deform_conv2d_backward_cpu(
            grad_out, input, offset, weight, bias, mask, stride, padding, dilation, output_mask
        )
    geometry, _ = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    need = _needed(output_mask, bias, mask)
    grads = _reference_backward(grad_out, input, offset, weight, bias, mask, geometry, need)
    return _pack_grads(grads, input, offset, weight, bias, mask, need)


def _pack_grads(grads, input, offset, weight, bias, mask, need) -> Grads:
    return tuple(  # type: ignore[return-value]
        _grad_like(g, like, n, layout, input)
        for g, like, n, layout in zip(grads, (input, offset, weight, bias, mask), need, _GRADIENT_FORMATS, strict=True)
    )


def _deform_conv2d_backward_cpu(grad_out, input, offset, weight, bias, mask, stride, padding, dilation, output_mask):
    geometry, offset_groups = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    need = _needed(output_mask, bias, mask)
    if not _load_cpu_extension():
        grads = _reference_backward(grad_out, input, offset, weight, bias, mask, geometry, need)
    else:
        tensors = [t for t in (grad_out, input, offset, weight, bias, mask) if t is not None]
        cast = _cast((grad_out, input, offset, weight, bias, mask), _compute_dtype(tensors, half_ok=False))
        grads = _cpu_backward(*cast, geometry, offset_groups, need)
    return _pack_grads(grads, input, offset, weight, bias, mask, need)


@_deform_conv2d_backward_op.register_kernel("cuda")
def _deform_conv2d_backward_cuda(grad_out, input, offset, weight, bias, mask, stride, padding, dilation, output_mask):
    geometry, offset_groups = _validated(input, offset, weight, bias, mask, stride, padding, dilation)
    need = _needed(output_mask, bias, mask)
    grads = _cuda_backward(grad_out, input, offset, weight, bias, mask, geometry, offset_groups, need)
    return _pack_grads(grads, input, offset, weight, bias, mask, need)


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_out, input, offset, weight, bias, mask, stride, padding, dilation, output_mask):
    need = _needed(output_mask, bias, mask)
    like = (input, offset, weight, bias, mask)
    return tuple(
        (t.new_empty(t.shape).contiguous(memory_format=layout(t)) if n else t.new_empty(0))
        if t is not None
        else input.new_empty(0)
        for t, n, layout in zip(like, need, _GRADIENT_FORMATS, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.geometry = (list(stride), list(padding), list(dilation))
    ctx.save_for_backward(input, offset, weight, bias, mask)


def _backward(ctx, grad_out: Tensor):
    input, offset, weight, bias, mask = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = _deform_conv2d_backward_op(grad_out, input, offset, weight, bias, mask, *ctx.geometry, need)
    grads = [g if n and t is not None else None for g, n, t in zip(grads, need, ctx.saved_tensors, strict=True)]
    return (*grads, None, None, None)


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_DEFORM_CONV2D = torch.ops.dcn_experiments.deform_conv2d.default  # the op itself, one Python frame fewer


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
    NCHW in, NCHW out; channels-last in, channels-last out. Calls the custom op
    ``torch.ops.dcn_experiments.deform_conv2d``, which ``torch.compile`` and ``torch.export`` keep
    as one node.
    """
    return _DEFORM_CONV2D(
        input, offset, weight, bias, mask, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
    )
