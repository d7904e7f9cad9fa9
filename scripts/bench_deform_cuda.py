#!/usr/bin/env python
"""Deformable convolution on CUDA: Triton vs torchvision vs cuDNN, per layer and end to end.

1. Parity (first; a failure makes the exit status 1): the Triton kernel against torchvision's
   (fp32 values and all five gradients) and against a float64 reference (fp16/bf16), and the
   project op routed to Triton (``backend_usage``/``precision_usage`` say what ran).
2. Per layer (ResNet-34 on 32 px and U-Net on 128 px shapes, batch 64): forward and
   forward+backward median time and peak memory for ``triton``, ``torchvision`` and ``cudnn``
   (``F.conv2d``, the regular layer) at fp32 / bf16 / fp16. torchvision has no bf16 kernel: its
   bf16 row runs under autocast, which computes in fp32 (what a ``trainer.amp`` run got before
   the Triton kernel), and says so in the ``computes`` column.
3. End to end: training images/s of both arms (regular; deformable with each CUDA kernel) under
   autocast bf16 and fp16 on synthetic data.

    python scripts/bench_deform_cuda.py --quick            # < 2 min on an H100
    python scripts/bench_deform_cuda.py --output bench_deform_cuda.json

Prints markdown tables and writes everything as JSON (``--output``). Without CUDA or Triton it
exits with one line and status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, in channels, out channels, input side, stride): the 3x3 convolutions DCNv2 placement makes
# deformable (ResNet-34 stages 2-4 on CIFAR-size input plus stage 1 for placement=all; the U-Net
# bottleneck and decoder on 128 px COCO crops, width 32).
RESNET34 = [
    ("r34.s1 64@32", 64, 64, 32, 1),
    ("r34.s2 64>128@32/2", 64, 128, 32, 2),
    ("r34.s2 128@16", 128, 128, 16, 1),
    ("r34.s3 128>256@16/2", 128, 256, 16, 2),
    ("r34.s3 256@8", 256, 256, 8, 1),
    ("r34.s4 256>512@8/2", 256, 512, 8, 2),
    ("r34.s4 512@4", 512, 512, 4, 1),
]
UNET = [
    ("unet.mid 256>512@8", 256, 512, 8, 1),
    ("unet.mid 512@8", 512, 512, 8, 1),
    ("unet.up4 512>256@16", 512, 256, 16, 1),
    ("unet.up3 256>128@32", 256, 128, 32, 1),
    ("unet.up2 128>64@64", 128, 64, 64, 1),
    ("unet.up1 64>32@128", 64, 32, 128, 1),
    ("unet.up1 32@128", 32, 32, 128, 1),
]
QUICK_LAYERS = ["r34.s2 128@16", "r34.s4 256>512@8/2", "unet.up2 128>64@64"]


DEVICE = ["cuda"]  # "cpu" only for --cpu-smoke (a check of this script without a GPU)


def synchronize() -> None:
    if DEVICE[0] == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE[0] == "cuda":
        torch.cuda.empty_cache()


def fail(message: str) -> int:
    print(f"bench_deform_cuda: {message}", file=sys.stderr)
    return 2


def layer_tensors(cin, cout, side, stride, batch, dtype, seed=0) -> dict[str, torch.Tensor]:
    """Input, weight, offsets (about half a pixel), mask and an output gradient for one 3x3 layer."""
    gen = torch.Generator(device=DEVICE[0]).manual_seed(seed)
    out_side = (side + 2 - 3) // stride + 1

    def rand(*shape, scale=1.0, uniform=False):
        draw = torch.rand if uniform else torch.randn
        t = draw(*shape, generator=gen, device=DEVICE[0])
        return (t * scale).to(dtype).requires_grad_()

    return {
        "x": rand(batch, cin, side, side),
        "weight": rand(cout, cin, 3, 3, scale=(2.0 / (9 * cin)) ** 0.5),
        "offset": rand(batch, 18, out_side, out_side, scale=0.5),
        "mask": rand(batch, 9, out_side, out_side, scale=2.0, uniform=True),
        "grad": torch.randn(batch, cout, out_side, out_side, generator=gen, device=DEVICE[0]).to(dtype),
    }


def implementations(stride: int, dtype: torch.dtype) -> dict[str, tuple[Callable, str]]:
    """name -> (fn(tensors) -> output, the dtype it really computes in)."""
    import torchvision

    from dcn_experiments.ops.triton_deform import deform_conv2d_triton

    def triton_fn(t):
        return deform_conv2d_triton(t["x"], t["offset"], t["weight"], None, stride, 1, 1, t["mask"])

    def torchvision_fn(t):
        if dtype == torch.bfloat16:  # no bf16 kernel: compute in fp32, as its autocast rule does
            fp32 = {key: value.float() for key, value in t.items()}
            return torchvision.ops.deform_conv2d(
                fp32["x"], fp32["offset"], fp32["weight"], None, stride, 1, 1, fp32["mask"]
            ).to(dtype)
        return torchvision.ops.deform_conv2d(t["x"], t["offset"], t["weight"], None, stride, 1, 1, t["mask"])

    def cudnn_fn(t):
        return F.conv2d(t["x"], t["weight"], None, stride, 1)

    name = str(dtype).removeprefix("torch.")
    return {
        "triton": (triton_fn, name),
        "torchvision": (torchvision_fn, "float32" if dtype == torch.bfloat16 else name),
        "cudnn": (cudnn_fn, name),
    }


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    synchronize()
    if DEVICE[0] != "cuda":
        return statistics.median(_wall_ms(fn) for _ in range(iters))
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _wall_ms(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it (MiB)."""
    if DEVICE[0] != "cuda":
        return float("nan")
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_cell(fn: Callable, tensors: dict[str, torch.Tensor], warmup: int, iters: int) -> dict:
    """Forward and forward+backward time and peak memory of one implementation on one layer."""

    def forward():
        with torch.no_grad():
            fn(tensors)

    def forward_backward():
        for key in ("x", "weight", "offset", "mask"):
            tensors[key].grad = None
        fn(tensors).backward(tensors["grad"])

    try:
        return {
            "fwd_ms": time_ms(forward, warmup, iters),
            "fwd_bwd_ms": time_ms(forward_backward, warmup, iters),
            "fwd_mib": peak_mib(forward),
            "fwd_bwd_mib": peak_mib(forward_backward),
        }
    except Exception as error:  # one failing cell must not lose the rest of the table
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}


def bench_layers(layers, batch: int, warmup: int, iters: int) -> list[dict]:
    rows = []
    for name, cin, cout, side, stride in layers:
        for dname, dtype in DTYPES.items():
            tensors = layer_tensors(cin, cout, side, stride, batch, dtype)
            for impl, (fn, computes) in implementations(stride, dtype).items():
                row = {"layer": name, "dtype": dname, "impl": impl, "computes": computes, "batch": batch}
                row |= measure_cell(fn, tensors, warmup, iters)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del tensors
            empty_cache()
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _run_case(fn, dtype, tensors, grad, geometry):
    """Output and the gradients of every given tensor, with all tensors in ``dtype``."""
    leaves = {key: None if t is None else t.detach().to(dtype).clone().requires_grad_() for key, t in tensors.items()}
    stride, pad, dil = geometry
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], stride, pad, dil, leaves["mask"])
    out.backward(grad.to(dtype))
    return out, {key: t.grad for key, t in leaves.items() if t is not None}


def parity_case(base: dict, grad: torch.Tensor, geometry: tuple, dtype: torch.dtype) -> dict:
    """Triton in ``dtype`` vs torchvision fp32 (for fp32) or the float64 reference on rounded inputs."""
    import torchvision

    from dcn_experiments.ops import deform_conv2d_reference
    from dcn_experiments.ops.triton_deform import deform_conv2d_triton

    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    out, grads = _run_case(deform_conv2d_triton, dtype, base, grad, geometry)
    if dtype == torch.float32:
        ref_out, ref_grads = _run_case(torchvision.ops.deform_conv2d, torch.float32, base, grad, geometry)
        against = "torchvision fp32"
    else:
        rounded = {key: None if t is None else t.to(dtype).double() for key, t in base.items()}
        ref_out, ref_grads = _run_case(
            deform_conv2d_reference, torch.float64, rounded, grad.to(dtype).double(), geometry
        )
        against = "float64 reference on the rounded inputs"
    errors = {"output": _rel(out, ref_out)} | {key: _rel(g, ref_grads[key]) for key, g in grads.items()}
    worst = max(errors.values())
    ok = math.isfinite(worst) and worst < tolerance and set(grads) == set(ref_grads)
    return {"against": against, "errors": errors, "worst": worst, "limit": tolerance, "ok": ok}


def parity() -> dict:
    """Triton vs torchvision (fp32) and vs a float64 reference (fp16/bf16), on a few geometries."""
    cases = {
        "v2 16>32 s1": dict(n=4, c=16, o=32, side=12, stride=1, dil=1, groups=1, og=1, mask=True),
        "v1 32>16 s2 d2 g2 og4": dict(n=3, c=32, o=16, side=13, stride=2, dil=2, groups=2, og=4, mask=False),
        "v2 64>64 s1 (wide)": dict(n=2, c=64, o=64, side=9, stride=1, dil=1, groups=1, og=1, mask=True),
    }
    results: dict[str, dict] = {}
    for label, cfg in cases.items():
        gen = torch.Generator(device=DEVICE[0]).manual_seed(1)
        k, pad = 3, cfg["dil"]
        out_side = (cfg["side"] + 2 * pad - cfg["dil"] * (k - 1) - 1) // cfg["stride"] + 1
        base = {
            "input": torch.randn(cfg["n"], cfg["c"], cfg["side"], cfg["side"], generator=gen, device=DEVICE[0]),
            "offset": 2 * torch.randn(cfg["n"], 2 * cfg["og"] * 9, out_side, out_side, generator=gen, device=DEVICE[0]),
            "weight": torch.randn(cfg["o"], cfg["c"] // cfg["groups"], 3, 3, generator=gen, device=DEVICE[0]) / 10,
            "bias": torch.randn(cfg["o"], generator=gen, device=DEVICE[0]),
            "mask": torch.rand(cfg["n"], cfg["og"] * 9, out_side, out_side, generator=gen, device=DEVICE[0])
            if cfg["mask"]
            else None,
        }
        grad = torch.randn(cfg["n"], cfg["o"], out_side, out_side, generator=gen, device=DEVICE[0])
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            dname = str(dtype).removeprefix("torch.")
            try:
                results[f"{label} {dname}"] = parity_case(base, grad, (cfg["stride"], pad, cfg["dil"]), dtype)
            except Exception as error:  # a kernel that fails to build or run is a parity failure, not a crash
                results[f"{label} {dname}"] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
            r = results[f"{label} {dname}"]
            verdict = r.get("error") or f"max rel error {r['worst']:.2e} vs {r['against']}"
            print(f"parity {label} {dname}: {verdict} -> {'ok' if r['ok'] else 'FAILED'}", flush=True)
    try:
        results["op routing"] = op_routing() if DEVICE[0] == "cuda" else {"ok": True, "skipped": "CPU smoke"}
    except Exception as error:
        results["op routing"] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
    print(f"op routing (bf16): {results['op routing']}", flush=True)
    return results


def op_routing() -> dict:
    """The project op on bf16 CUDA tensors under each kernel setting: what ran, in which dtype."""
    from dcn_experiments import ops

    if not hasattr(ops, "use_cuda_kernel"):
        return {"ok": False, "error": "dcn_experiments.ops has no use_cuda_kernel (routing not installed)"}
    x = torch.randn(2, 8, 6, 6, device=DEVICE[0], dtype=torch.bfloat16)
    off = torch.randn(2, 18, 6, 6, device=DEVICE[0], dtype=torch.bfloat16)
    weight = torch.randn(8, 8, 3, 3, device=DEVICE[0], dtype=torch.bfloat16)
    seen, previous = {}, ops.cuda_kernel()
    try:
        for choice in ("auto", "torchvision", "triton"):
            ops.use_cuda_kernel(choice)
            ops.reset_backend_usage()
            ops.deform_conv2d(x, off, weight, None, 1, 1, 1, None)
            seen[choice] = {"backend": ops.backend_usage(), "precision": ops.precision_usage()}
    finally:
        ops.use_cuda_kernel(previous)
    ok = "triton-cuda" in seen["triton"]["backend"] and "bfloat16" in seen["triton"]["precision"]
    return {"ok": ok, "seen": seen}


def train_throughput(model_name, side, options, conv_name, conv_options, dtype, batch, steps, warmup) -> dict:
    """Images/s of SGD steps under autocast on one synthetic batch, and what the deformable layers ran."""
    from dcn_experiments import ops
    from dcn_experiments.models import CONVS, MODELS

    try:
        torch.manual_seed(0)
        conv = CONVS.build(conv_name, **conv_options)
        net = MODELS.build(model_name, num_classes=10, conv=conv, **options).to(DEVICE[0])
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(DEVICE[0], enabled=dtype == torch.float16)
        x = torch.randn(batch, 3, side, side, device=DEVICE[0])
        shape = (batch, side, side) if model_name == "unet" else (batch,)
        target = torch.randint(0, 10, shape, device=DEVICE[0])

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE[0], dtype=dtype):
                loss = F.cross_entropy(net(x), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(warmup):
            step()
        synchronize()
        ops.reset_backend_usage()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        return {
            "images_per_s": batch * steps / (time.perf_counter() - started),
            "deformable_backend": ops.backend_usage(),
            "deformable_precision": ops.precision_usage(),
        }
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}


def bench_end_to_end(models, batch: int, steps: int, warmup: int) -> list[dict]:
    """Training images/s of both arms under autocast (bf16, fp16 with a GradScaler)."""
    arms = [
        ("regular", "regular", None),
        ("deformable", "deformable", "torchvision"),
        ("deformable", "deformable", "triton"),
    ]
    rows = []
    for model_name, side, options in models:
        for pname, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for arm, conv_name, kernel in arms:
                conv_options = {"placement": "stages"} | ({"cuda_kernel": kernel} if kernel else {})
                row = {"model": model_name, "precision": pname, "arm": arm, "kernel": kernel or "-", "batch": batch}
                row |= train_throughput(model_name, side, options, conv_name, conv_options, dtype, batch, steps, warmup)
                rows.append(row)
                print(json.dumps(row), flush=True)
                empty_cache()
    return rows


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(layers: list[dict]) -> dict:
    """Geometric-mean time ratios over the ResNet-34 shapes, and the issue's two targets."""
    index = {(r["layer"], r["dtype"], r["impl"]): r for r in layers if "error" not in r}
    names = sorted({r["layer"] for r in layers if r["layer"].startswith("r34")})

    def ratio(dtype, impl, base, key):
        pairs = [(index.get((n, dtype, impl)), index.get((n, dtype, base))) for n in names]
        return geomean([a[key] / b[key] for a, b in pairs if a and b])

    summary = {}
    for dtype in DTYPES:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            summary[f"{dtype} {key} triton/cudnn"] = ratio(dtype, "triton", "cudnn", key)
            summary[f"{dtype} {key} torchvision/cudnn"] = ratio(dtype, "torchvision", "cudnn", key)
            summary[f"{dtype} {key} triton/torchvision"] = ratio(dtype, "triton", "torchvision", key)
    summary["target bf16 f+b triton within 1.5x of cudnn"] = summary["bf16 fwd_bwd_ms triton/cudnn"] <= 1.5
    summary["target fp32 triton no slower than torchvision (f+b)"] = (
        summary["fp32 fwd_bwd_ms triton/torchvision"] <= 1.0
    )
    return summary


def markdown_layers(rows: list[dict]) -> str:
    lines = [
        "| layer | dtype | impl | computes | fwd ms | f+b ms | fwd MiB | f+b MiB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['dtype']} | {r['impl']} | {r['computes']} | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['layer']} | {r['dtype']} | {r['impl']} | {r['computes']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['fwd_mib']:.0f} | {r['fwd_bwd_mib']:.0f} |"
        )
    return "\n".join(lines)


def markdown_end_to_end(rows: list[dict]) -> str:
    lines = ["| model | precision | arm | kernel | images/s | deformable ran as |", "|---|---|---|---|---:|---|"]
    for r in rows:
        ran = ", ".join(f"{k} {v}" for k, v in {**r.get("deformable_backend", {})}.items())
        ran += " / " + ", ".join(r.get("deformable_precision", {})) if r.get("deformable_precision") else ""
        speed = f"{r['images_per_s']:.0f}" if "images_per_s" in r else r.get("error", "")
        lines.append(f"| {r['model']} | {r['precision']} | {r['arm']} | {r['kernel']} | {speed} | {ran or '-'} |")
    return "\n".join(lines)


def triton_fp32_precision() -> str:
    from dcn_experiments.ops import triton_deform

    return str(triton_deform._dot_flags(torch.float32)["PRECISION"])


def environment() -> dict:
    import torchvision
    import triton

    on_gpu = DEVICE[0] == "cuda"
    return {
        "gpu": torch.cuda.get_device_name() if on_gpu else "none (--cpu-smoke, Triton interpreter)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if on_gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "triton_fp32_dot_precision": triton_fp32_precision(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 layers, few iterations, ResNet-34 only end to end")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the per-layer and end-to-end runs")
    parser.add_argument("--output", default="bench_deform_cuda.json", help="where to write the JSON results")
    parser.add_argument("--skip-end-to-end", action="store_true", help="per-layer tables only")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="check this script on CPU (needs TRITON_INTERPRET=1): tiny shapes, times mean nothing",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return fail("--cpu-smoke needs TRITON_INTERPRET=1 in the environment")
        DEVICE[0] = "cpu"
    elif not torch.cuda.is_available():
        return fail("needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    from dcn_experiments.ops import triton_deform

    if not triton_deform.triton_available():
        return fail(f"needs Triton ({triton_deform.TRITON_IMPORT_ERROR})")
    output = Path(args.output)
    if output.exists() and output.is_dir():
        return fail(f"--output {output} is a directory; give a file path")

    started = time.perf_counter()
    results: dict = {"environment": environment(), "quick": args.quick}
    print(f"# {results['environment']['gpu']}, torch {torch.__version__}, triton {results['environment']['triton']}")
    results["parity"] = parity()
    parity_ok = all(r.get("ok", False) for r in results["parity"].values())

    layers, batch = RESNET34 + UNET, args.batch
    models = [("resnet34", 32, {"width": 64}), ("unet", 128, {"width": 32})]
    warmup, iters, steps, e2e_warmup = (5, 20, 30, 10)
    if args.quick:
        layers = [layer for layer in layers if layer[0] in QUICK_LAYERS]
        models, (warmup, iters, steps, e2e_warmup) = models[:1], (2, 5, 5, 3)
    if args.cpu_smoke:
        layers, batch = [("r34.smoke 8>16@6/2", 8, 16, 6, 2), ("unet.smoke 16@6", 16, 16, 6, 1)], 2
        models, (warmup, iters, steps, e2e_warmup) = [("resnet34", 8, {"width": 4})], (0, 1, 1, 0)
    results["layers"] = bench_layers(layers, batch, warmup, iters)
    results["summary"] = summarize(results["layers"])
    if not args.skip_end_to_end:
        results["end_to_end"] = bench_end_to_end(models, batch, steps, e2e_warmup)
    results["seconds"] = time.perf_counter() - started

    print("\n## Per layer (median of CUDA-event timings)\n")
    print(markdown_layers(results["layers"]))
    print("\n## Geometric means over the ResNet-34 shapes\n")
    for key, value in results["summary"].items():
        print(f"- {key}: {value if isinstance(value, bool) else f'{value:.2f}'}")
    if "end_to_end" in results:
        print("\n## End to end (training, synthetic data)\n")
        print(markdown_end_to_end(results["end_to_end"]))
    output.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {output} in {results['seconds']:.0f} s; parity {'ok' if parity_ok else 'FAILED'}")
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
