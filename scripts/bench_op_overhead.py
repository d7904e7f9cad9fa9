#!/usr/bin/env python
"""What the public op costs on top of its CPU kernels: the C++ dispatch path against the Python one.

Arms, on the same inputs, timed in interleaved rounds (medians):

* ``raw``: the kernels' raw operators (``torch.ops.dcn_experiments_cpu.deform_conv2d_forward`` /
  ``_backward``): no argument checks, no autograd. The floor.
* ``op``: ``dcn_experiments.ops.deform_conv2d`` with autograd, as a model calls it. Once the C++
  library is loaded, its own CPU and autograd kernels of the op serve CPU tensors
  (``deform_conv2d_op.cpp``).
* ``op, Python kernels``: the same with those switched off (``set_public_cpu_kernels(False)``): the
  op's Python kernels and autograd formula, the path every call took before that file existed. Its
  calls also pass through the C++ kernels' redirect to the Python ones, which the earlier code did
  not have: about 10 us per forward and 40 us per forward+backward on the tiny layer (measured
  against the previous release's code), so this arm overstates the old path by that much.

The switch is set before each timed call, outside the timing.

Rows: a tiny layer (all overhead), the U-Net layer shapes of ``bench_deform.py`` (batch 16), the
ResNet-34 layers at batch 1 (latency), and whole models: a ``quick_seg`` U-Net training step (width 8,
batch 16, 64 px; forward, loss and backward) and a batch-1 eval forward of the U-Net and ResNet-34.
Forward rows run under ``no_grad``; forward+backward rows hand the op a contiguous gradient, as
training does.

    python scripts/bench_op_overhead.py                  # 1 thread, by CPU time; prints a table, writes JSON
    python scripts/bench_op_overhead.py --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ARMS = ("raw", "op", "op, Python kernels")
LAYERS = [  # (name, channels, size, batch)
    ("tiny 4ch@8", 4, 8, 1),
    *((f"U-Net {c}ch@{s}", c, s, 16) for c, s in [(8, 128), (8, 64), (16, 64), (16, 32), (32, 32), (64, 32)]),
    *((f"ResNet {c}ch@{s} b1", c, s, 1) for c, s in [(64, 32), (128, 16), (256, 8), (512, 4)]),
]


def layer_calls(channels: int, size: int, batch: int) -> dict[tuple[str, str], Callable[[], object]]:
    """(arm, phase) -> a call of one 3x3 DCNv2 layer, phase ``fwd`` or ``f+b`` (the op arms' calls
    need the switch set for their arm: see :func:`set_kernels_for`)."""
    from dcn_experiments.ops import deform_conv2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen)
    weight = torch.randn(channels, channels, 3, 3, generator=gen) * 0.05
    offset = torch.randn(batch, 18, size, size, generator=gen) * 0.5
    mask = torch.rand(batch, 9, size, size, generator=gen) * 2
    leaves = [t.clone().requires_grad_() for t in (x, offset, weight, mask)]
    grad = torch.ones(batch, channels, size, size)
    raw = torch.ops.dcn_experiments_cpu

    def raw_forward() -> torch.Tensor:
        return raw.deform_conv2d_forward(x, weight, None, offset, mask, 1, 1, 1, 1, 1, 1, 1)

    def raw_forward_backward() -> None:
        raw_forward()
        raw.deform_conv2d_backward(grad, x, weight, offset, mask, 1, 1, 1, 1, 1, 1, 1, True, True, True, True, False)

    def op_forward() -> None:
        with torch.no_grad():
            deform_conv2d(x, offset, weight, None, 1, 1, 1, mask)

    def op_forward_backward() -> torch.Tensor:
        for leaf in leaves:
            leaf.grad = None
        out = deform_conv2d(leaves[0], leaves[1], leaves[2], None, 1, 1, 1, leaves[3])
        out.backward(grad)
        return out

    calls = {("raw", "fwd"): raw_forward, ("raw", "f+b"): raw_forward_backward}
    for arm in ARMS[1:]:
        calls[(arm, "fwd")] = op_forward
        calls[(arm, "f+b")] = op_forward_backward
    return calls


def model_calls(args: argparse.Namespace) -> dict[str, dict[tuple[str, str], Callable[[], object]]]:
    """Whole-model rows: name -> (arm, phase) -> call (the op arms only: a model has no raw form)."""
    from dcn_experiments.models import CONVS, MODELS

    def build(name: str, **kwargs) -> torch.nn.Module:
        conv = CONVS.build("deformable", placement="stages")
        return MODELS.build(name, conv=conv, **kwargs)

    torch.manual_seed(0)
    unet = build("unet", num_classes=5, width=8)
    images, masks = torch.randn(16, 3, 64, 64), torch.randint(0, 5, (16, 64, 64))

    def unet_step() -> None:
        unet.zero_grad(set_to_none=True)
        F.cross_entropy(unet(images), masks).backward()

    unet_eval, resnet_eval = build("unet", num_classes=5, width=8).eval(), build("resnet34", num_classes=10).eval()
    one_image, one_small_image = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32)

    def forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(x)

        return call

    rows = {
        "quick_seg U-Net step": ("f+b", unet_step),
        "U-Net w8 eval, batch 1": ("fwd", forward(unet_eval, one_image)),
        "ResNet-34 eval, batch 1": ("fwd", forward(resnet_eval, one_small_image)),
    }
    return {name: {(arm, phase): fn for arm in ARMS[1:]} for name, (phase, fn) in rows.items()}


def set_kernels_for(arm: str) -> None:
    """Switch the op's C++ CPU kernels on for arm ``op``, off for ``op, Python kernels`` (``raw``
    calls the kernels directly either way)."""
    torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(arm != "op, Python kernels")


def time_interleaved(calls: dict, rounds: int, clock: Callable[[], float]) -> dict:
    """Median seconds of each (arm, phase) call, every call once per round (warm-up round first); the
    order rotates by one call per round, so that no call always follows the same one. The arm's
    kernels are switched in before the clock starts."""
    for (arm, _), fn in calls.items():
        set_kernels_for(arm)
        fn()
    times: dict = {key: [] for key in calls}
    keys = list(calls)
    try:
        for round_index in range(rounds):
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                set_kernels_for(key[0])
                start = clock()
                calls[key]()
                times[key].append(clock() - start)
    finally:
        set_kernels_for("op")
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> int:
    """Parse arguments, time every row, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--clock", choices=["wall", "thread"], default="thread", help="thread: CPU time, 1 thread only")
    parser.add_argument("--skip-models", action="store_true", help="layers only")
    parser.add_argument("--layers", type=int, default=len(LAYERS), help="time only the first N layer rows")
    parser.add_argument("--out", type=Path, default=Path("bench_op_overhead.json"))
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        print("error: --clock thread measures the calling thread only; use it with --threads 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from dcn_experiments.ops import cpu_extension_available

    if not cpu_extension_available():
        print("error: the C++ kernel could not be built; this benchmark compares its dispatch paths", file=sys.stderr)
        return 1
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rows = []
    for name, channels, size, batch in LAYERS[: args.layers]:
        times = time_interleaved(layer_calls(channels, size, batch), args.rounds, clock)
        for phase in ("fwd", "f+b"):
            rows.append({"row": name, "phase": phase} | {arm: times[(arm, phase)] * 1e3 for arm in ARMS})
    if not args.skip_models:
        for name, calls in model_calls(args).items():
            times = time_interleaved(calls, args.rounds, clock)
            phase = next(iter(calls))[1]
            rows.append(
                {"row": name, "phase": phase, "raw": None} | {arm: times[(arm, phase)] * 1e3 for arm in ARMS[1:]}
            )
    print(f"{args.threads} thread(s), {args.clock} clock, medians of {args.rounds} interleaved rounds, ms\n")
    print("| row | phase | raw | op | op, Python kernels | op - raw (us) | Python - raw (us) | op / Python |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        raw, op, python = r["raw"], r["op"], r["op, Python kernels"]
        extra = [f"{(t - raw) * 1e3:.0f}" if raw is not None else "-" for t in (op, python)]
        raw_text = f"{raw:.3f}" if raw is not None else "-"
        print(
            f"| {r['row']} | {r['phase']} | {raw_text} | {op:.3f} | {python:.3f} | "
            f"{extra[0]} | {extra[1]} | {op / python:.2f} |"
        )
    environment = {"threads": args.threads, "clock": args.clock, "rounds": args.rounds, "torch": torch.__version__}
    environment["machine"] = platform.machine()
    args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
