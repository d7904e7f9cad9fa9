#!/usr/bin/env python
"""Training throughput, regular vs deformable, next to the ceiling that any deformable kernel can reach.

Three arms per model, built from the same seed, trained on the same random batch, timed in
interleaved rounds (medians of the rounds; every arm runs ``--steps`` steps per round):

* ``regular``: every convolution a regular one;
* ``deformable``: DCNv2 at placement ``stages`` with this project's deformable op;
* ``zero-cost op``: the same deformable model with the op replaced by ``F.conv2d`` on the layer's
  input and weight. The offset/mask branches are still computed, and they stay in the graph and
  are trained (their outputs enter the loss with weight 0). This arm's throughput is what a
  deformable op exactly as fast as a regular convolution would give: the ceiling of any kernel work,
  set by the offset/mask branches (3x3 convolutions with 27 outputs). Keeping the branches in the
  graph costs one sum of the offsets and one add, so the measured ceiling is slightly conservative.

Models: ResNet-34 (width 64, batch 32, 32 px: the end-to-end target of #12) and the U-Net of
``experiment=quick_seg`` (width 8, batch 16, 64 px, 5 classes). The ``quick_seg`` epoch ratio that
``dcn-train`` reports also holds data loading and evaluation, which both arms share, so it lies a
little closer to 1 than the step ratio here.

    python scripts/bench_training.py                    # 2 threads, prints a table, writes bench_training.json
    python scripts/bench_training.py --models unet --rounds 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARMS = ("regular", "deformable", "zero-cost op")


def zero_cost_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A DeformConv2d forward whose deformable op costs what ``F.conv2d`` costs: the offset/mask
    branch runs and trains as in the real layer, the output is the regular convolution's."""
    offset, mask = self.offsets_and_mask(x)
    if self.training:  # the real layer's offset statistics, so that both arms do the same work
        magnitude = offset.detach().abs()
        self._offset_stats.append(torch.stack([magnitude.mean(), magnitude.amax()]))
    out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
    kept = offset.sum() if mask is None else offset.sum() + mask.sum()
    return out + 0.0 * kept  # the branch's backward still runs


def build_arm(model: str, arm: str, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model (train mode) and one random batch (inputs, targets) of ``arm`` for ``model``."""
    from dcn_experiments.models import CONVS, MODELS
    from dcn_experiments.models.conv import DeformConv2d

    torch.manual_seed(0)
    factory = CONVS.build("regular" if arm == "regular" else "deformable", placement="stages")
    if model == "resnet34":
        net = MODELS.build("resnet34", num_classes=10, conv=factory, width=args.resnet_width)
        x = torch.randn(args.resnet_batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.resnet_batch,))
    else:
        net = MODELS.build("unet", num_classes=5, conv=factory, width=args.unet_width)
        x = torch.randn(args.unet_batch, 3, args.unet_size, args.unet_size)
        y = torch.randint(0, 5, (args.unet_batch, args.unet_size, args.unet_size))
    if arm == "zero-cost op":
        for layer in net.modules():
            if isinstance(layer, DeformConv2d):
                layer.forward = types.MethodType(zero_cost_forward, layer)
    if args.channels_last:  # as trainer.channels_last=true does
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return net.train(), x, y


def training_step(model: str, arm: str, args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], None]]:
    """One Adam step (the offset branches at the deformable default's 0.1x learning rate), and the
    call that drops the offset statistics the steps gathered (the trainer's once per epoch)."""
    from dcn_experiments.engine.optim import build_optimizer

    net, x, y = build_arm(model, arm, args)
    optimizer = build_optimizer(net, "adam", 1e-3, 0.0, 0.9, 0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    def drain() -> None:
        for layer in net.modules():
            if hasattr(layer, "pop_offset_stats"):
                layer.pop_offset_stats()

    return step, drain


def bench_model(model: str, args: argparse.Namespace) -> list[dict]:
    """Per arm: median step time over interleaved rounds, images per second, ratio to regular."""
    steps = {arm: training_step(model, arm, args) for arm in ARMS}
    for step, _ in steps.values():  # warm-up (builds the CPU kernel, first-touch allocations)
        step()
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.rounds):
        for arm, (step, drain) in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[arm].append((time.perf_counter() - start) / args.steps)
            drain()  # outside the timed steps, as the trainer's per-epoch call is
    batch = args.resnet_batch if model == "resnet34" else args.unet_batch
    rows = []
    for arm in ARMS:
        seconds = statistics.median(times[arm])
        rows.append({"model": model, "arm": arm, "batch": batch, "step_ms": 1e3 * seconds, "img_s": batch / seconds})
    regular, deformable = rows[0], rows[1]
    for row in rows:
        row["throughput_vs_regular"] = row["img_s"] / regular["img_s"]
        row["step_time_vs_regular"] = row["step_ms"] / regular["step_ms"]
    # The share of the deformable step that a free op would save: what kernel work could still win.
    rows[2]["op_share_of_deformable_step"] = 1 - rows[2]["step_ms"] / deformable["step_ms"]
    print(f"  measured {model}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    """The results as a Markdown table."""
    print("| model | arm | batch | step ms | img/s | throughput vs regular | step time vs regular |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['arm']} | {r['batch']} | {r['step_ms']:.1f} | {r['img_s']:.1f} | "
            f"{r['throughput_vs_regular']:.2f} | {r['step_time_vs_regular']:.2f} |"
        )
    for r in rows:
        if "op_share_of_deformable_step" in r:
            print(
                f"{r['model']}: the deformable op's cost over a free one is "
                f"{100 * r['op_share_of_deformable_step']:.0f} % of the deformable step"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", default="resnet34,unet", help="comma-separated: resnet34, unet")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=0, help="steps per arm per round (0: 2 ResNet, 8 U-Net)")
    parser.add_argument("--resnet-width", type=int, default=64)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--unet-width", type=int, default=8)
    parser.add_argument("--unet-batch", type=int, default=16)
    parser.add_argument("--unet-size", type=int, default=64)
    parser.add_argument("--channels-last", action="store_true", help="model and inputs channels-last")
    parser.add_argument("--out", type=Path, default=Path("bench_training.json"))
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"resnet34", "unet"})
    if unknown or not models:
        parser.error(f"--models takes resnet34 and/or unet, got {args.models!r}")
    if args.rounds < 1 or args.steps < 0:
        parser.error("--rounds must be >= 1 and --steps >= 0")
    torch.set_num_threads(args.threads)
    rows = []
    for model in models:
        model_args = argparse.Namespace(**vars(args))
        if not args.steps:
            model_args.steps = 2 if model == "resnet34" else 8
        rows += bench_model(model, model_args)
    print_table(rows)
    from dcn_experiments.ops import cpu_extension_available

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "cpp_kernel": cpu_extension_available(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
