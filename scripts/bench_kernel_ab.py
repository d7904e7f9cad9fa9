#!/usr/bin/env python
"""A/B the C++ CPU deformable kernel of a git revision against the working tree's, in one process.

Both kernels are built side by side (the baseline under another operator namespace), then timed in
interleaved rounds on the same inputs, NCHW in, per layer shape: forward and forward+backward,
with ``F.conv2d`` as the yardstick. Medians over rounds; compare the ratios, not the milliseconds.
ResNet-34 shapes run at ``--batch``, U-Net shapes at ``--unet-batch`` (``--batch 1`` sets both).
The ``resnet34_stride2`` family is the first convolution of ResNet-34's stages 2-4 (stride 2, the
channels doubling); it is reported on its own, outside the stride-1 families' geomeans.

On a machine shared with other jobs, ``--threads 1 --clock thread`` times each call by the CPU time of
the calling thread, which other processes do not inflate (a thread waiting for a core is not
counted); with more threads only wall time is meaningful.

    python scripts/bench_kernel_ab.py --baseline HEAD~1       # prints a table, writes bench_kernel_ab.json
    python scripts/bench_kernel_ab.py --baseline HEAD~1 --threads 1 --clock thread
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
# (family, in channels, out channels, input size, stride): ResNet-34 stages at 32 px; U-Net levels
# (8-64 channels at 32-128 px), the same as scripts/bench_deform.py's; ResNet-34's stride-2 layers
SHAPES = (
    [("resnet34", c, c, s, 1) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
    + [("unet", c, c, s, 1) for c, s in ((8, 128), (8, 64), (16, 64), (16, 32), (32, 32), (64, 32))]
    + [("resnet34_stride2", c, 2 * c, s, 2) for c, s in ((64, 32), (128, 16), (256, 8))]
)
FAMILIES = tuple(dict.fromkeys(shape[0] for shape in SHAPES))


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
    s = t["stride"]
    out = ops.deform_conv2d_forward(t["x"], t["w"], None, t["off"], t["mask"], s, s, 1, 1, 1, 1, 1)
    if backward:
        grad = torch.ones_like(out)
        ops.deform_conv2d_backward(grad, t["x"], t["w"], t["off"], t["mask"], s, s, 1, 1, 1, 1, 1, *[True] * 4, False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline kernel")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall", help="thread: CPU time, 1 thread only")
    parser.add_argument("--family", choices=FAMILIES, help="time only this family's shapes")
    parser.add_argument("--out", type=Path, default=Path("bench_kernel_ab.json"))
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        sys.exit("error: --clock thread measures the calling thread only; use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    from dcn_experiments.ops import cpu_extension_available

    if not cpu_extension_available():
        sys.exit("error: the working tree's C++ kernel could not be built")
    with tempfile.TemporaryDirectory() as build_dir:
        build_baseline(args.baseline, Path(build_dir))
    rows = []
    for family, channels, out_channels, size, stride in SHAPES:
        if args.family and family != args.family:
            continue
        batch = args.batch if family != "unet" or args.batch == 1 else args.unet_batch
        gen = torch.Generator().manual_seed(0)
        out_size = (size - 1) // stride + 1  # 3x3, padding 1
        t = {
            "x": torch.randn(batch, channels, size, size, generator=gen),
            "w": torch.randn(out_channels, channels, 3, 3, generator=gen) * 0.05,
            "off": torch.randn(batch, 18, out_size, out_size, generator=gen) * 0.5,
            "mask": torch.rand(batch, 9, out_size, out_size, generator=gen) * 2,
            "stride": stride,
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
                    start = clock()
                    fn(backward)
                    times[f"{name}_{phase}"].append(clock() - start)
        row = {"family": family, "channels": channels, "size": size, "batch": batch}
        row |= {"out_channels": out_channels, "stride": stride}
        row |= {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append(row)
    header = (
        f"{'layer':>20} | {'fwd base':>8} {'fwd now':>8} {'now/base':>8} | "
        f"{'f+b base':>8} {'f+b now':>8} {'now/base':>8} | {'f+b now/conv':>12}"
    )
    print(f"{args.threads} threads, baseline {args.baseline}, ms ({args.clock} clock, medians of {args.rounds} rounds)")
    print(header)
    for r in rows:
        print(
            f"{_layer_name(r):>20} | {r['baseline_fwd']:8.2f} {r['current_fwd']:8.2f} "
            f"{r['current_fwd'] / r['baseline_fwd']:8.2f} | {r['baseline_fwdbwd']:8.2f} {r['current_fwdbwd']:8.2f} "
            f"{r['current_fwdbwd'] / r['baseline_fwdbwd']:8.2f} | {r['current_fwdbwd'] / r['conv2d_fwdbwd']:12.2f}"
        )
    geomeans: dict[str, float] = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        for phase in ("fwd", "fwdbwd"):
            for who in ("current", "baseline"):
                key = f"{family}_{phase}_{who}_vs_conv2d"
                geomeans[key] = statistics.geometric_mean([r[f"{who}_{phase}"] / r[f"conv2d_{phase}"] for r in mine])
            key = f"{family}_{phase}_now_vs_base"
            geomeans[key] = statistics.geometric_mean([r[f"current_{phase}"] / r[f"baseline_{phase}"] for r in mine])
    for key, value in geomeans.items():
        print(f"geomean {key}: {value:.3f}")
    summary = {
        "baseline": args.baseline,
        "batch": args.batch,
        "unet_batch": args.unet_batch,
        "threads": args.threads,
        "clock": args.clock,
        "geomeans": geomeans,
        "rows": rows,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    return 0


def _layer_name(row: dict) -> str:
    name = f"{row['channels']}x{row['size']}px b{row['batch']}"
    return f"{name} s2>{row['out_channels']}" if row["stride"] != 1 else name


def _conv(t: dict, backward: bool) -> None:
    x = t["x"].detach().requires_grad_(backward)
    w = t["w"].detach().requires_grad_(backward)
    out = F.conv2d(x, w, stride=t["stride"], padding=1)
    if backward:
        out.backward(torch.ones_like(out))


if __name__ == "__main__":
    sys.exit(main())
