"""Deformable convolution (DCN v1/v2) in Triton: the CUDA kernel with native fp16/bf16.

Drop-in for the C++ CPU extension: :func:`forward` and :func:`backward` take the same arguments in
the same order as ``torch.ops.dcn_experiments_cpu.deform_conv2d_forward/_backward``; results match
``torchvision.ops.deform_conv2d`` (bilinear sampling, corners outside the image read as zero, the
offset gradient is the one-sided derivative through ``floor``, as in ``deform_conv2d_cpu.cpp``).

Every kernel is an implicit GEMM: the sampled columns are built tile by tile in registers (fp32
bilinear interpolation, rounded to the input dtype) and fed to ``tl.dot`` with fp32 accumulation;
they are never written to memory.

* forward: one program per (output positions x output channels) tile.
* weight gradient: ``grad_out^T @ columns`` per (output channels x (tap, channel)) tile over a slice
  of the output positions; the slices' fp32 partials are summed in a fixed order afterwards, so it
  is deterministic (no atomics).
* offset and mask gradients: one program per (tile of output positions, tap, offset group) reduces
  over that offset group's channels itself: deterministic, no atomics.
* input gradient: the column gradient (``grad_out @ W``) is scattered to the four bilinear corners
  of each sampling point with fp32 ``atomic_add``. Where a point lands depends on the learned
  offsets, so any input pixel can receive from any number of (position, tap) pairs and no fixed
  ownership exists; the summation order (and so the last bits of this gradient) can vary from run
  to run, as in torchvision's CUDA kernel, which scatters the same way.

Fp32 inputs use TF32 in the GEMMs only when ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's
matmul default is off, and torchvision's kernel uses full fp32); otherwise 3xTF32, which keeps
fp32-level accuracy on the tensor cores. Under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), whose ``tl.dot`` mishandles bfloat16, bf16 tiles are rounded to bf16 and
multiplied as fp32: the same products and fp32 accumulation the GPU computes.

Importing this module never fails: without Triton, :func:`triton_available` is False.
"""

# Triton kernels spell shapes and compile-time constants in capitals (M, KK, BLOCK_M), as Triton does.
# ruff: noqa: N803, E741

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from dcn_experiments.ops.deform_conv import _check_arguments, memory_format_of

try:  # the module must import (and say why not) on machines without Triton
    import triton
    import triton.language as tl
except Exception as error:  # pragma: no cover - exercised only where Triton is missing or broken
    triton, tl = None, None
    TRITON_IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    TRITON_IMPORT_ERROR = None

TRITON_CUDA = "triton-cuda"  # backend name recorded in ``backend_usage``
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """Whether Triton imported (the kernels run on CUDA tensors, or on CPU under its interpreter)."""
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels were defined under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_INTERPRETED = interpreting()  # fixed when the kernels below are defined

if triton is not None:

    @triton.jit
    def _tap_position(
        off_ptr, msk_ptr, n64, oy, ox, m_ok, og, k, KW, KK,
        sh, sw, ph, pw, dh, dw,
        son, soc, soh, sow, smn, smc, smh, smw,
        HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        """Sampling point (y, x) and modulation of tap ``k``, offset group ``og``, per output position."""
        ki = k // KW
        kj = k - ki * KW
        channel = (og * KK + k) * 2
        base = off_ptr + n64 * son + oy * soh + ox * sow
        dy = tl.load(base + channel * soc, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.load(base + (channel + 1) * soc, mask=m_ok, other=0.0).to(tl.float32)
        y = (oy * sh - ph + ki * dh).to(tl.float32) + dy
        x = (ox * sw - pw + kj * dw).to(tl.float32) + dx
        if HAS_MASK:
            mod = tl.load(msk_ptr + n64 * smn + (og * KK + k) * smc + oy * smh + ox * smw, mask=m_ok, other=0.0).to(
                tl.float32
            )
        else:
            mod = dy * 0.0 + 1.0
        return y, x, mod

    @triton.jit
    def _corners(y, x, H, W, m_ok):
        """Top-left corner, fractional parts and which of the four bilinear corners lie inside."""
        # Clamping keeps far-away points outside (all corners invalid) without int32 overflow.
        y = tl.minimum(tl.maximum(y, -2.0), H + 1.0)
        x = tl.minimum(tl.maximum(x, -2.0), W + 1.0)
        y0f = tl.floor(y)
        x0f = tl.floor(x)
        ly = y - y0f
        lx = x - x0f
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        in_y0 = (y0 >= 0) & (y0 < H) & m_ok
        in_y1 = (y0 + 1 >= 0) & (y0 + 1 < H) & m_ok
        in_x0 = (x0 >= 0) & (x0 < W)
        in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
        return y0, x0, ly, lx, in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1

    @triton.jit
    def _load_corners(x_row, c, c_ok, sxc, sxh, sxw, y0, x0, in00, in01, in10, in11):
        """The four corner values (fp32, zero outside) of each (position, channel) pair."""
        at = x_row[:, None] + c[None, :].to(tl.int64) * sxc + (y0 * sxh + x0 * sxw)[:, None]
        ok = c_ok[None, :]
        v00 = tl.load(at, mask=in00[:, None] & ok, other=0.0).to(tl.float32)
        v01 = tl.load(at + sxw, mask=in01[:, None] & ok, other=0.0).to(tl.float32)
        v10 = tl.load(at + sxh, mask=in10[:, None] & ok, other=0.0).to(tl.float32)
        v11 = tl.load(at + sxh + sxw, mask=in11[:, None] & ok, other=0.0).to(tl.float32)
        return v00, v01, v10, v11

    @triton.jit
    def _sample(
        x_row, c, c_ok, sxc, sxh, sxw, y, x, mod, H, W, m_ok,
    ):  # fmt: skip
        """Modulated bilinear samples (fp32) of a (positions x channels) tile at points (y, x)."""
        y0, x0, ly, lx, in00, in01, in10, in11 = _corners(y, x, H, W, m_ok)
        v00, v01, v10, v11 = _load_corners(x_row, c, c_ok, sxc, sxh, sxw, y0, x0, in00, in01, in10, in11)
        hy = 1.0 - ly
        hx = 1.0 - lx
        top = v00 * hx[:, None] + v01 * lx[:, None]
        bottom = v10 * hx[:, None] + v11 * lx[:, None]
        return (top * hy[:, None] + bottom * ly[:, None]) * mod[:, None]

    @triton.jit
    def _mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """acc + a @ b with fp32 accumulation (operands in the input dtype)."""
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _forward_kernel(
        x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr, out_ptr,
        M, L, Wo, H, W, KW, KK, Cgw, Og, Cpg,
        sh, sw, ph, pw, dh, dw,
        sxn, sxc, sxh, sxw, son, soc, soh, sow, smn, smc, smh, smw, syn, syc, syh, syw,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        tiles = tl.cdiv(Og, BLOCK_N)
        g = pid_n // tiles
        o_loc = (pid_n % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = o_loc < Og
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        n = m // L
        pos = m % L
        oy = pos // Wo
        ox = pos % Wo
        n64 = n.to(tl.int64)
        x_row = x_ptr + n64 * sxn
        c_begin = g * Cgw
        c_end = c_begin + Cgw
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, KK):
            # The group's channels, cut where the offset group changes: each piece shares one offset.
            for og in range(c_begin // Cpg, (c_end - 1) // Cpg + 1):
                y, x, mod = _tap_position(
                    off_ptr, msk_ptr, n64, oy, ox, m_ok, og, k, KW, KK, sh, sw, ph, pw, dh, dw,
                    son, soc, soh, sow, smn, smc, smh, smw, HAS_MASK,
                )  # fmt: skip
                lo = tl.maximum(c_begin, og * Cpg)
                hi = tl.minimum(c_end, og * Cpg + Cpg)
                for c0 in range(lo, hi, BLOCK_K):
                    c = c0 + tl.arange(0, BLOCK_K)
                    c_ok = c < hi
                    a = _sample(x_row, c, c_ok, sxc, sxh, sxw, y, x, mod, H, W, m_ok)
                    w_at = ((g * KK + k) * Cgw + (c - c_begin))[:, None] * Og + o_loc[None, :]
                    b = tl.load(w_ptr + w_at, mask=c_ok[:, None] & o_ok[None, :], other=0.0)
                    acc = _mma(acc, a.to(b.dtype), b, UPCAST, PRECISION)
        o = g * Og + o_loc
        if HAS_BIAS:
            acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        y_at = (n64 * syn + oy * syh + ox * syw)[:, None] + o[None, :].to(tl.int64) * syc
        tl.store(out_ptr + y_at, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _grad_weight_kernel(
        x_ptr, off_ptr, msk_ptr, go_ptr, part_ptr,
        M, L, Wo, H, W, KW, KK, O, Cgw, Og, Cpg, rows_per_split,
        sh, sw, ph, pw, dh, dw,
        sxn, sxc, sxh, sxw, son, soc, soh, sow, smn, smc, smh, smw, sgn, sgc, sgh, sgw,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_o = tl.program_id(0)
        pid_c = tl.program_id(1)
        split = tl.program_id(2)
        tiles = tl.cdiv(Og, BLOCK_N)
        g = pid_o // tiles
        o_loc = (pid_o % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = o_loc < Og
        c_blocks = tl.cdiv(Cgw, BLOCK_K)
        k = pid_c // c_blocks
        c_loc = (pid_c % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = c_loc < Cgw
        c = g * Cgw + c_loc
        c_first = g * Cgw + (pid_c % c_blocks) * BLOCK_K
        c_last = tl.minimum(c_first + BLOCK_K, g * Cgw + Cgw) - 1
        m_begin = split * rows_per_split
        m_end = tl.minimum(M, m_begin + rows_per_split)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < m_end
            n = m // L
            pos = m % L
            oy = pos // Wo
            ox = pos % Wo
            n64 = n.to(tl.int64)
            x_row = x_ptr + n64 * sxn
            a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for og in range(c_first // Cpg, c_last // Cpg + 1):
                y, x, mod = _tap_position(
                    off_ptr, msk_ptr, n64, oy, ox, m_ok, og, k, KW, KK, sh, sw, ph, pw, dh, dw,
                    son, soc, soh, sow, smn, smc, smh, smw, HAS_MASK,
                )  # fmt: skip
                in_group = c_ok & (c // Cpg == og)
                a += _sample(x_row, c, in_group, sxc, sxh, sxw, y, x, mod, H, W, m_ok)
            go_at = (n64 * sgn + oy * sgh + ox * sgw)[:, None] + (g * Og + o_loc)[None, :].to(tl.int64) * sgc
            go = tl.load(go_ptr + go_at, mask=m_ok[:, None] & o_ok[None, :], other=0.0)
            acc = _mma(acc, tl.trans(go), a.to(go.dtype), UPCAST, PRECISION)
        # partials laid out (split, O, Cgw, KK): their sum over splits is the weight gradient
        at = ((split * O + g * Og + o_loc).to(tl.int64) * Cgw)[:, None] + c_loc[None, :]
        tl.store(part_ptr + at * KK + k, acc, mask=o_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _grad_data_kernel(
        x_ptr, off_ptr, msk_ptr, go_ptr, w_ptr, gx_ptr, goff_ptr, gmsk_ptr,
        M, L, Wo, H, W, KW, KK, Cgw, Og, Cpg, G,
        sh, sw, ph, pw, dh, dw,
        sxn, sxc, sxh, sxw, son, soc, soh, sow, smn, smc, smh, smw, sgn, sgc, sgh, sgw,
        gxn, gxc, gxh, gxw,
        NEED_INPUT: tl.constexpr, NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        n = m // L
        pos = m % L
        oy = pos // Wo
        ox = pos % Wo
        n64 = n.to(tl.int64)
        x_row = x_ptr + n64 * sxn
        gx_row = gx_ptr + n64 * gxn
        go_row = n64 * sgn + oy * sgh + ox * sgw
        # one (tap, offset group) per program along axis 1: more programs for deep, small layers, and
        # each (position, offset group, tap) offset/mask gradient still has one owner
        k = tl.program_id(1) // G
        og = tl.program_id(1) % G
        y, x, mod = _tap_position(
            off_ptr, msk_ptr, n64, oy, ox, m_ok, og, k, KW, KK, sh, sw, ph, pw, dh, dw,
            son, soc, soh, sow, smn, smc, smh, smw, HAS_MASK,
        )  # fmt: skip
        y0, x0, ly, lx, in00, in01, in10, in11 = _corners(y, x, H, W, m_ok)
        hy = 1.0 - ly
        hx = 1.0 - lx
        d00 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        d01 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        d10 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        d11 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c_stop = og * Cpg + Cpg
        for c0 in range(og * Cpg, c_stop, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_ok = c < c_stop
            wg = c // Cgw  # weight group of each channel
            c_loc = c - wg * Cgw
            # column gradient (positions x channels) = grad_out @ W over the channels' groups
            gcol = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            o_lo = (c0 // Cgw) * Og
            o_hi = ((tl.minimum(c0 + BLOCK_K, c_stop) - 1) // Cgw + 1) * Og
            for o0 in range(o_lo, o_hi, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                o_ok = o < o_hi
                go = tl.load(
                    go_ptr + go_row[:, None] + o[None, :].to(tl.int64) * sgc,
                    mask=m_ok[:, None] & o_ok[None, :],
                    other=0.0,
                )
                w_at = ((wg[None, :] * KK + k) * Cgw + c_loc[None, :]) * Og + (o[:, None] - wg[None, :] * Og)
                w_ok = o_ok[:, None] & c_ok[None, :] & (o[:, None] // Og == wg[None, :])
                w = tl.load(w_ptr + w_at, mask=w_ok, other=0.0)
                gcol = _mma(gcol, go, w, UPCAST, PRECISION)
            if NEED_INPUT:
                at = gx_row[:, None] + c[None, :].to(tl.int64) * gxc + (y0 * gxh + x0 * gxw)[:, None]
                scaled = gcol * mod[:, None]
                ok = c_ok[None, :]
                tl.atomic_add(at, scaled * (hy * hx)[:, None], mask=in00[:, None] & ok)
                tl.atomic_add(at + gxw, scaled * (hy * lx)[:, None], mask=in01[:, None] & ok)
                tl.atomic_add(at + gxh, scaled * (ly * hx)[:, None], mask=in10[:, None] & ok)
                tl.atomic_add(at + gxh + gxw, scaled * (ly * lx)[:, None], mask=in11[:, None] & ok)
            if NEED_OFFSET or NEED_MASK:
                v00, v01, v10, v11 = _load_corners(x_row, c, c_ok, sxc, sxh, sxw, y0, x0, in00, in01, in10, in11)
                d00 += tl.sum(gcol * v00, axis=1)
                d01 += tl.sum(gcol * v01, axis=1)
                d10 += tl.sum(gcol * v10, axis=1)
                d11 += tl.sum(gcol * v11, axis=1)
        slot = (n64 * G + og) * KK + k  # grad_offset/grad_mask buffers: (N, G, KK, [2,] L)
        if NEED_OFFSET:
            gy = mod * (hx * (d10 - d00) + lx * (d11 - d01))
            gxx = mod * (hy * (d01 - d00) + ly * (d11 - d10))
            tl.store(goff_ptr + (slot * 2) * L + pos, gy, mask=m_ok)
            tl.store(goff_ptr + (slot * 2 + 1) * L + pos, gxx, mask=m_ok)
        if NEED_MASK:
            gm = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
            tl.store(gmsk_ptr + slot * L + pos, gm, mask=m_ok)


def _next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _blocks(out_per_group: int, channels_per_group: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps: small tiles under the interpreter (fast tests), GPU tiles otherwise.

    The GPU choice is the largest tile of each kernel that ptxas (sm_80/sm_90, Triton 3.8) compiles
    without register spills at 8 warps; bigger tiles spilled 0.1-5 KB per thread. ``tl.dot`` needs
    every dimension >= 16. Not tuned on a GPU yet.
    """
    if _INTERPRETED:
        return {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_O": 16, "BLOCK_K_DATA": 16, "num_warps": 4}
    return {
        "BLOCK_M": 64,
        "BLOCK_N": min(64, max(16, _next_pow2(out_per_group))),
        # fp32 (3xTF32) needs more registers per product: narrower channel and output blocks
        "BLOCK_K": min(16 if dtype == torch.float32 else 32, max(16, _next_pow2(channels_per_group))),
        "BLOCK_O": min(32 if dtype == torch.float32 else 64, max(16, _next_pow2(out_per_group))),
        "BLOCK_K_DATA": 16,
        "num_warps": 8,
    }


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    upcast = _INTERPRETED and dtype == torch.bfloat16
    if dtype != torch.float32 or _INTERPRETED:  # the setting means nothing for fp16/bf16 operands
        return {"UPCAST": upcast, "PRECISION": "ieee" if _INTERPRETED else "tf32"}
    # fp32: TF32 where torch allows it for matmuls; else 3xTF32 (fp32-level accuracy on tensor cores).
    # DCN_TRITON_FP32_PRECISION=ieee|tf32x3|tf32 overrides (ieee: plain fp32 FMA, slowest).
    default = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    precision = os.environ.get("DCN_TRITON_FP32_PRECISION", default)
    if precision not in ("ieee", "tf32x3", "tf32"):
        raise RuntimeError(f"DCN_TRITON_FP32_PRECISION={precision!r} is not valid; use ieee, tf32x3 or tf32")
    return {"UPCAST": False, "PRECISION": precision}


def _require(input: Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"deform_conv2d: the Triton kernel needs triton ({TRITON_IMPORT_ERROR})")
    if input.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"deform_conv2d (Triton): dtype {input.dtype} is not supported; use float32/16 or bfloat16")
    if input.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError("deform_conv2d (Triton): tensors must be on a CUDA device (or TRITON_INTERPRET=1)")


def _weight_by_tap(weight: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """Weight (O, Cgw, kh, kw) as contiguous (groups, kh*kw, Cgw, O/groups) in ``dtype``."""
    out_c, cgw, kh, kw = weight.shape
    return weight.to(dtype).reshape(groups, out_c // groups, cgw, kh * kw).permute(0, 3, 2, 1).contiguous()


def _channels_last(t: Tensor) -> Tensor:
    """NHWC storage (a no-op when already so): each bilinear corner is one contiguous channel vector,
    so the gathers become vector loads and the input-gradient atomics coalesce."""
    return t.contiguous(memory_format=torch.channels_last)


def _strides(t: Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    offset: Tensor,
    mask: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
    offset_groups: int,
) -> Tensor:
    """Deformable convolution output (N, O, Ho, Wo) in the input's dtype and memory format.

    Arguments as the C++ extension's ``deform_conv2d_forward``; shapes must already be valid.
    Offset, mask, weight and bias are used in the input's dtype; accumulation is fp32.
    """
    _require(input)
    n, c, h, w = input.shape
    out_c, cgw, kh, kw = weight.shape
    groups = c // cgw
    out_h, out_w = offset.shape[2:]
    out = torch.empty(
        (n, out_c, out_h, out_w), dtype=input.dtype, device=input.device, memory_format=memory_format_of(input)
    )
    if out.numel() == 0:
        return out
    dtype = input.dtype
    offset = offset.to(dtype)
    mask = mask.to(dtype) if mask is not None else None
    wt = _weight_by_tap(weight, groups, dtype)
    x = _channels_last(input)
    blocks = _blocks(out_c // groups, cgw, input.dtype)
    m_total, positions = n * out_h * out_w, out_h * out_w
    grid = (triton.cdiv(m_total, blocks["BLOCK_M"]), groups * triton.cdiv(out_c // groups, blocks["BLOCK_N"]))
    _forward_kernel[grid](
        x, offset, mask if mask is not None else offset, wt, bias if bias is not None else wt, out,
        m_total, positions, out_w, h, w, kw, kh * kw, cgw, out_c // groups, c // offset_groups,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        *x.stride(), *offset.stride(), *_strides(mask), *out.stride(),
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, **_dot_flags(dtype),
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"],
        num_warps=blocks["num_warps"],
    )  # fmt: skip
    return out


def _weight_splits(m_total: int, programs: int, block_m: int) -> int:
    """Slices of the output positions for the weight gradient: enough programs to fill a GPU."""
    target = 2 if _INTERPRETED else 1024
    return max(1, min(triton.cdiv(m_total, block_m), target // max(1, programs)))


def backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dil_h: int,
    dil_w: int,
    offset_groups: int,
    need_input: bool,
    need_offset: bool,
    need_mask: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(input, offset, mask, weight, bias)`` as the C++ extension's ``deform_conv2d_backward``.

    Each is None unless requested; each has its tensor's dtype (the input gradient also its memory
    format). Only the input gradient uses atomics (see the module docstring).
    """
    _require(input)
    n, c, h, w = input.shape
    out_c, cgw, kh, kw = weight.shape
    groups, taps = c // cgw, kh * kw
    out_h, out_w = offset.shape[2:]
    m_total, positions = n * out_h * out_w, out_h * out_w
    dtype = input.dtype
    need_mask = need_mask and mask is not None
    offset_c, mask_c = offset.to(dtype), mask.to(dtype) if mask is not None else None
    grad_out = grad_out.to(dtype)
    blocks = _blocks(out_c // groups, cgw, input.dtype)
    flags = _dot_flags(dtype)
    geometry = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    input_nhwc = _channels_last(input)
    common = (*input_nhwc.stride(), *offset_c.stride(), *_strides(mask_c), *grad_out.stride())
    mask_arg = mask_c if mask_c is not None else offset_c

    grad_input = grad_offset = grad_mask = grad_weight = grad_bias = None
    if need_bias:
        grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
    if need_weight:
        programs = groups * triton.cdiv(out_c // groups, blocks["BLOCK_N"]) * taps * triton.cdiv(cgw, blocks["BLOCK_K"])
        splits = _weight_splits(m_total, programs, blocks["BLOCK_M"])
        rows = triton.cdiv(triton.cdiv(max(m_total, 1), splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
        splits = triton.cdiv(max(m_total, 1), rows)
        partials = torch.zeros((splits, out_c, cgw, taps), dtype=torch.float32, device=input.device)
        if m_total > 0:
            grid = (
                groups * triton.cdiv(out_c // groups, blocks["BLOCK_N"]),
                taps * triton.cdiv(cgw, blocks["BLOCK_K"]),
                splits,
            )
            _grad_weight_kernel[grid](
                input_nhwc, offset_c, mask_arg, grad_out, partials,
                m_total, positions, out_w, h, w, kw, taps, out_c, cgw, out_c // groups, c // offset_groups, rows,
                *geometry, *common,
                HAS_MASK=mask is not None, **flags,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"],
                num_warps=blocks["num_warps"],
            )  # fmt: skip
        grad_weight = partials.sum(0).view(out_c, cgw, kh, kw).to(weight.dtype)
    if need_input or need_offset or need_mask:
        f32 = {"dtype": torch.float32, "device": input.device}
        gx = torch.zeros_like(input_nhwc, memory_format=torch.channels_last, **f32) if need_input else None
        goff = torch.empty((n, offset_groups * taps * 2, out_h, out_w), **f32) if need_offset else None
        gmsk = torch.empty((n, offset_groups * taps, out_h, out_w), **f32) if need_mask else None
        if m_total > 0:
            placeholder = gx if gx is not None else (goff if goff is not None else gmsk)
            _grad_data_kernel[(triton.cdiv(m_total, blocks["BLOCK_M"]), taps * offset_groups)](
                input_nhwc, offset_c, mask_arg, grad_out, _weight_by_tap(weight, groups, dtype),
                gx if gx is not None else placeholder,
                goff if goff is not None else placeholder,
                gmsk if gmsk is not None else placeholder,
                m_total, positions, out_w, h, w, kw, taps, cgw, out_c // groups, c // offset_groups, offset_groups,
                *geometry, *common, *(_strides(gx)),
                NEED_INPUT=need_input, NEED_OFFSET=need_offset, NEED_MASK=need_mask,
                HAS_MASK=mask is not None, **flags,
                BLOCK_M=blocks["BLOCK_M"], BLOCK_O=blocks["BLOCK_O"], BLOCK_K=blocks["BLOCK_K_DATA"],
                num_warps=blocks["num_warps"],
            )  # fmt: skip
        elif goff is not None or gmsk is not None:
            goff = goff.zero_() if goff is not None else None
            gmsk = gmsk.zero_() if gmsk is not None else None
        grad_input = gx.to(input.dtype, memory_format=memory_format_of(input)) if gx is not None else None
        grad_offset = goff.to(offset.dtype) if goff is not None else None
        grad_mask = gmsk.to(mask.dtype) if gmsk is not None else None
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


class _DeformConv2dTriton(torch.autograd.Function):
    """Autograd wrapper around :func:`forward` / :func:`backward`."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation, offset_groups):
        ctx.geometry = (stride, padding, dilation, offset_groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, offset, weight, mask)
        return forward(input, weight, bias, offset, mask, *stride, *padding, *dilation, offset_groups)

    @staticmethod
    def backward(ctx, grad_out):
        input, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation, offset_groups = ctx.geometry
        need = ctx.needs_input_grad
        gi, go, gm, gw, gb = backward(
            grad_out, input, weight, offset, mask, *stride, *padding, *dilation, offset_groups,
            need[0], need[1], need[4] and mask is not None, need[2], need[3] and ctx.has_bias,
        )  # fmt: skip
        return gi, go, gw, gb if ctx.has_bias else None, gm, None, None, None, None


def deform_conv2d_triton(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` computed by the Triton kernels (differentiable).

    All tensors are used in the input's dtype (float32, float16 or bfloat16).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    offset_groups = _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    return _DeformConv2dTriton.apply(input, offset, weight, bias, mask, stride, padding, dilation, offset_groups)


def cuda_forward(input, offset, weight, bias, mask, geometry, offset_groups: int) -> Tensor:
    """:func:`forward` in the calling convention of ``deform_conv.register_cuda_kernel``."""
    (sh, sw), (ph, pw), (dh, dw) = geometry
    return forward(input, weight, bias, offset, mask, sh, sw, ph, pw, dh, dw, offset_groups)


def cuda_backward(grad_out, input, offset, weight, bias, mask, geometry, offset_groups: int, need):
    """:func:`backward` in the calling convention of ``deform_conv.register_cuda_kernel``: ``need`` and
    the result are ordered (input, offset, weight, bias, mask)."""
    (sh, sw), (ph, pw), (dh, dw) = geometry
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = backward(
        grad_out, input, weight, offset, mask, sh, sw, ph, pw, dh, dw, offset_groups,
        need[0], need[1], need[4] and mask is not None, need[2], need[3] and bias is not None,
    )  # fmt: skip
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask
