#!/usr/bin/env python
"""A/B the C++ CPU deformable kernel of a git revision against the working tree's, in one process.

Both kernels are built side by side (the baseline under another operator namespace), then timed in
interleaved rounds on the same inputs, NCHW in, per layer shape: forward and forward+backward,
with ``F.conv2d`` as the yardstick. Medians over rounds; compare the ratios, not the milliseconds.

    python scripts/bench_kernel_ab.py --baseline HEAD~1       # prints a table, writes bench_kernel_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
SOURCE = "dcn_experiments/ops/deform_conv2d_cpu.cpp"
# (channels, spatial size): ResNet-34 stages at 32 px, then U-Net levels at 64 px (width 8)
SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4), (8, 64), (16, 32), (32, 16), (64, 8), (128, 4)]


def build_baseline(revision: str, build_dir: Path) -> None:
    """Compile ``SOURCE`` as of ``revision`` with its operators renamed to ``dcn_baseline_cpu``."""
    from torch.utils.cpp_extension import load

    text = subprocess.run(
        ["git", "show", f"{revision}:{SOURCE}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    source = build_dir / "baseline.cpp"
    source.write_text(text.replace("TORCH_LIBRARY(dcn_experiments_cpu", "TORCH_LIBRARY(dcn_baseline_cpu"))
    load(
        name="dcn_baseline_cpu",
        sources=[str(source)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
    )


def kernel_call(namespace: str, t: dict, backward: bool) -> None:
    """One forward (and backward, all five gradients) through the raw operators of ``namespace``."""
    ops = getattr(torch.ops, namespace)
    out = ops.deform_conv2d_forward(t["x"], t["w"], None, t["off"], t["mask"], 1, 1, 1, 1, 1, 1, 1)
    if backward:
        grad = torch.ones_like(out)
        ops.deform_conv2d_backward(grad, t["x"], t["w"], t["off"], t["mask"], 1, 1, 1, 1, 1, 1, 1, *[True] * 4, False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline kernel")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench_kernel_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dcn_experiments.ops import cpu_extension_available

    if not cpu_extension_available():
        sys.exit("error: the working tree's C++ kernel could not be built")
    with tempfile.TemporaryDirectory() as build_dir:
        build_baseline(args.baseline, Path(build_dir))
    rows = []
    for channels, size in SHAPES:
        gen = torch.Generator().manual_seed(0)
        t = {
            "x": torch.randn(args.batch, channels, size, size, generator=gen),
            "w": torch.randn(channels, channels, 3, 3, generator=gen) * 0.05,
            "off": torch.randn(args.batch, 18, size, size, generator=gen) * 0.5,
            "mask": torch.rand(args.batch, 9, size, size, generator=gen) * 2,
        }
        contenders = {
            "baseline": lambda backward, t=t: kernel_call("dcn_baseline_cpu", t, backward),
            "current": lambda backward, t=t: kernel_call("dcn_experiments_cpu", t, backward),
            "conv2d": lambda backward, t=t: _conv(t, backward),
        }
        times: dict[str, list[float]] = {f"{k}_{p}": [] for k in contenders for p in ("fwd", "fwdbwd")}
        for fn in contenders.values():  # warm-up
            fn(True)
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                for phase, backward in (("fwd", False), ("fwdbwd", True)):
                    start = time.perf_counter()
                    fn(backward)
                    times[f"{name}_{phase}"].append(time.perf_counter() - start)
        row = {"channels": channels, "size": size, **{k: statistics.median(v) * 1e3 for k, v in times.items()}}
        rows.append(row)
    header = (
        f"{'layer':>10} | {'fwd base':>8} {'fwd now':>8} {'now/base':>8} | "
        f"{'f+b base':>8} {'f+b now':>8} {'now/base':>8} | {'f+b now/conv':>12}"
    )
    print(f"batch {args.batch}, {args.threads} threads, baseline {args.baseline}, ms (medians of {args.rounds})")
    print(header)
    for r in rows:
        print(
            f"{r['channels']:>4}x{r['size']:>3}px | {r['baseline_fwd']:8.2f} {r['current_fwd']:8.2f} "
            f"{r['current_fwd'] / r['baseline_fwd']:8.2f} | {r['baseline_fwdbwd']:8.2f} {r['current_fwdbwd']:8.2f} "
            f"{r['current_fwdbwd'] / r['baseline_fwdbwd']:8.2f} | {r['current_fwdbwd'] / r['conv2d_fwdbwd']:12.2f}"
        )
    for phase in ("fwd", "fwdbwd"):
        ratios = [r[f"current_{phase}"] / r[f"baseline_{phase}"] for r in rows]
        print(f"geomean now/base {phase}: {statistics.geometric_mean(ratios):.3f}")
    summary = {"baseline": args.baseline, "batch": args.batch, "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(summary, indent=2))
    return 0


def _conv(t: dict, backward: bool) -> None:
    x = t["x"].detach().requires_grad_(backward)
    w = t["w"].detach().requires_grad_(backward)
    out = F.conv2d(x, w, padding=1)
    if backward:
        out.backward(torch.ones_like(out))


if __name__ == "__main__":
    sys.exit(main())
