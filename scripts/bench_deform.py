#!/usr/bin/env python
"""Benchmark deformable convolution: per layer (ResNet-34 CIFAR and U-Net shapes) and end to end.

Per layer, forward and forward+backward time and peak memory for: ``ours``
(``dcn_experiments.ops.deform_conv2d``), ``torchvision``, ``reference`` (our pure-PyTorch fallback),
``conv2d`` (``F.conv2d``, the regular layer) and, when ``onnx`` and ``onnxruntime`` are installed,
ONNX Runtime's ``DeformConv`` (forward only; opset 19). End to end, training throughput of
ResNet-34 regular vs deformable (placement ``stages`` and ``all``).

All numbers of one run come from the same machine state, so compare ratios, not absolute times.

The U-Net shapes (8-64 channels at 32-128 px, where the bilinear sampling weighs most next to the
small GEMMs) run at ``--unet-batch`` (16, the segmentation presets' batch).

``--batch 1`` measures inference latency instead: per layer (both shape families) and whole model
(ResNet-34 and U-Net, eval mode, regular vs deformable), forward only, ours vs ``F.conv2d`` vs ONNX
Runtime's ``DeformConv`` (per layer), at 1 thread and at ``--threads``.

    python scripts/bench_deform.py                       # CPU, 2 threads, writes bench_deform.json
    python scripts/bench_deform.py --batch 1 --out bench_deform_b1.json
    python scripts/bench_deform.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, spatial size) of ResNet-34 on 32 px
# U-Net decoder levels: width 8 at 64 px (experiment=quick_seg) and at 128 px, width 16-32 at 64 px
UNET_LAYERS = [(8, 128), (8, 64), (16, 64), (16, 32), (32, 32), (64, 32)]


def layer_inputs(channels: int, size: int, batch: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Input, weight, offsets (about half a pixel) and mask for one 3x3, stride-1 layer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(batch, channels, size, size, generator=gen),
        "weight": torch.randn(channels, channels, 3, 3, generator=gen) * 0.05,
        "offset": torch.randn(batch, 18, size, size, generator=gen) * 0.5,
        "mask": torch.rand(batch, 9, size, size, generator=gen) * 2,
    }
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def implementations() -> dict[str, Callable]:
    """name -> fn(inputs) -> output; None-valued names are unavailable here."""
    from dcn_experiments.ops import deform_conv2d, deform_conv2d_reference

    impls: dict[str, Callable] = {
        "ours": lambda t: deform_conv2d(t["x"], t["offset"], t["weight"], None, 1, 1, 1, t["mask"]),
        "conv2d": lambda t: F.conv2d(t["x"], t["weight"], padding=1),
        "reference": lambda t: deform_conv2d_reference(t["x"], t["offset"], t["weight"], None, 1, 1, 1, t["mask"]),
    }
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        impls["torchvision"] = lambda t: tv_deform_conv2d(t["x"], t["offset"], t["weight"], None, 1, 1, 1, t["mask"])
    except Exception:
        pass
    return impls


def sync(device: str) -> None:
    """Wait for queued device work."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn`` over up to ``repeats`` runs (fewer when one run exceeds the budget)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s:
            break
    return statistics.median(times)


def onnxruntime_forward(channels: int, size: int, batch: int, threads: int) -> Callable[[], object] | None:
    """A zero-argument ORT DeformConv forward on the same inputs, or None if ORT/onnx are missing."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    node = helper.make_node(
        "DeformConv",
        ["X", "W", "offset", "B", "mask"],
        ["Y"],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[1, 1],
        dilations=[1, 1],
        group=1,
        offset_group=1,
    )
    shape = {
        "X": [batch, channels, size, size],
        "W": [channels, channels, 3, 3],
        "offset": [batch, 18, size, size],
        "B": [channels],
        "mask": [batch, 9, size, size],
    }
    graph = helper.make_graph(
        [node],
        "deform",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shape.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's pool spin-waits after each call by default, stealing the cores from whatever is timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    t = {k: v.detach().numpy() for k, v in layer_inputs(channels, size, batch, "cpu").items()}
    feeds = {
        "X": t["x"],
        "W": t["weight"],
        "offset": t["offset"],
        "mask": t["mask"],
        "B": torch.zeros(channels).numpy(),
    }
    del onnx
    return lambda: session.run(None, feeds)


_PEAK_MEMORY_CHILD = """
import os, sys, threading, time, torch
sys.path.insert(0, {here!r})
from bench_deform import implementations, layer_inputs, sync
torch.set_num_threads({threads})
fn = implementations()[{impl!r}]
t = layer_inputs({channels}, {size}, {batch}, {device!r})
fn(t).sum().backward(); sync({device!r})  # warm-up: extension build, allocator caches
for v in t.values():
    v.grad = None
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * page
if {device!r} == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(t).sum().backward(); sync({device!r})
    peak = torch.cuda.max_memory_allocated()
else:
    base, peak, done = rss(), [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    fn(t).sum().backward()
    done[0] = True
    sampler.join()
    peak = max(peak[0], rss())
print((peak - base) / 2**20)
"""


def peak_memory_mb(impl: str, channels: int, size: int, batch: int, device: str, threads: int) -> float:
    """Extra memory at the peak of one forward+backward (after a warm-up), in a fresh process.

    CUDA: the caching allocator's peak. CPU: resident memory sampled every 0.5 ms, with glibc's
    mmap threshold fixed at 64 KiB so that freed buffers really leave the process.
    """
    code = _PEAK_MEMORY_CHILD.format(
        here=str(Path(__file__).resolve().parent),
        threads=threads,
        impl=impl,
        channels=channels,
        size=size,
        batch=batch,
        device=device,
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        return math.nan
    return float(result.stdout.strip().splitlines()[-1])


def layer_shapes(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(family, channels, size, batch) of every per-layer measurement."""
    shapes = [("resnet34", c, s, args.batch) for c, s in LAYERS]
    if not args.skip_unet:
        shapes += [("unet", c, s, args.unet_batch) for c, s in UNET_LAYERS]
    return shapes


def bench_layers(args: argparse.Namespace) -> list[dict]:
    """Per-layer forward / forward+backward times (interleaved rounds, medians) and peak memory."""
    impls = {k: v for k, v in implementations().items() if not (k == "reference" and args.skip_reference)}
    rows = []
    for family, channels, size, batch in layer_shapes(args):
        row: dict = {"layer": f"{channels}ch@{size}", "family": family, "channels": channels, "size": size}
        row["batch"] = batch
        calls: dict[str, Callable[[], object]] = {}
        for name, fn in impls.items():
            t = layer_inputs(channels, size, batch, args.device)

            def forward(fn=fn, t=t) -> None:
                with torch.no_grad():
                    fn(t)

            def forward_backward(fn=fn, t=t) -> None:
                for v in t.values():
                    v.grad = None
                fn(t).sum().backward()

            calls[f"{name}_fwd_ms"] = forward
            calls[f"{name}_fwdbwd_ms"] = forward_backward
        if args.device == "cpu":
            ort_fn = onnxruntime_forward(channels, size, batch, args.threads)
            if ort_fn is not None:
                calls["onnxruntime_fwd_ms"] = ort_fn
        times = time_interleaved(calls, args.device, args.repeats, _clock(args, args.threads))
        row.update({key: 1e3 * seconds for key, seconds in times.items()})
        if not args.skip_memory:
            for name in impls:
                if name == "reference" and batch * channels * size * size > 2**21:
                    continue  # the fallback's gathers need gigabytes on the large U-Net shapes
                row[f"{name}_peak_mb"] = peak_memory_mb(name, channels, size, batch, args.device, args.threads)
        rows.append(row)
        print(f"  measured {row['layer']}", file=sys.stderr, flush=True)
    return rows


def time_interleaved(
    calls: dict[str, Callable[[], object]], device: str, rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per call, running every call once per round so machine drift hits all alike.

    The order rotates by one call per round, so that no call always follows the same one (ours, first
    in the list, always followed torchvision's and ONNX Runtime's calls, which sweep the caches and
    free large buffers; one pair of runs on the U-Net shapes read 2.02x `F.conv2d` in that order and
    1.76x with the two swapped, but the machine's noise is of that size too).
    A call slower than 2 s is timed in the first rounds only, to bound the run time. ``clock`` may be
    ``time.thread_time`` for single-threaded calls on a shared machine (see ``--clock``).
    """
    times: dict[str, list[float]] = {key: [] for key in calls}
    for fn in calls.values():  # warm-up (also builds the CPU extension)
        fn()
    sync(device)
    keys = list(calls)
    for round_index in range(rounds):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn = calls[key]
            if round_index >= 2 and times[key] and min(times[key]) > 2.0:
                continue
            start = clock()
            fn()
            sync(device)
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def _clock(args: argparse.Namespace, threads: int) -> Callable[[], float]:
    """The calling thread's CPU time for ``--clock thread`` runs at 1 thread, else wall time."""
    return time.thread_time if args.clock == "thread" and threads == 1 else time.perf_counter


def bench_training(args: argparse.Namespace) -> list[dict]:
    """Training steps per second of ResNet-34 regular vs deformable on random 32 px images."""
    from dcn_experiments.engine.optim import build_optimizer
    from dcn_experiments.models import CONVS, MODELS

    results = []
    for conv, placement in (("regular", "stages"), ("deformable", "stages"), ("deformable", "all")):
        torch.manual_seed(0)
        factory = CONVS.build(conv, placement=placement)
        model = MODELS.build("resnet34", num_classes=10, conv=factory, width=args.width).to(args.device)
        optimizer = build_optimizer(model, "adam", 1e-3, 0.0, 0.9, 0.1)
        x = torch.randn(args.batch, 3, 32, 32, device=args.device)
        y = torch.randint(0, 10, (args.batch,), device=args.device)

        def step(model=model, optimizer=optimizer, x=x, y=y) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        step()  # warm-up
        seconds = time_call(step, args.device, args.train_steps, 120)
        results.append(
            {
                "conv": conv,
                "placement": placement,
                "width": args.width,
                "batch": args.batch,
                "step_s": seconds,
                "img_s": args.batch / seconds,
            }
        )
        print(f"  measured training {conv}/{placement}", file=sys.stderr, flush=True)
    regular = results[0]["img_s"]
    for r in results:
        r["throughput_vs_regular"] = r["img_s"] / regular
    return results


def bench_latency(args: argparse.Namespace) -> dict:
    """Batch-1 forward latency (ms) per layer and per whole model, at 1 thread and at ``--threads``."""
    from dcn_experiments.models import CONVS, MODELS
    from dcn_experiments.ops import deform_conv2d

    rounds = max(args.repeats, 21)  # millisecond calls: more rounds for a stable median
    layers, models = [], []
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        for family, channels, size, _ in layer_shapes(args):
            t = layer_inputs(channels, size, 1, "cpu")

            def ours(t=t) -> None:
                with torch.no_grad():
                    deform_conv2d(t["x"], t["offset"], t["weight"], None, 1, 1, 1, t["mask"])

            def conv2d(t=t) -> None:
                with torch.no_grad():
                    F.conv2d(t["x"], t["weight"], padding=1)

            calls: dict[str, Callable[[], object]] = {"ours": ours, "conv2d": conv2d}
            ort_fn = onnxruntime_forward(channels, size, 1, threads)
            if ort_fn is not None:
                calls["onnxruntime"] = ort_fn
            times = time_interleaved(calls, "cpu", rounds, _clock(args, threads))
            row = {"family": family, "layer": f"{channels}ch@{size}", "threads": threads}
            layers.append(row | {f"{k}_ms": 1e3 * v for k, v in times.items()})
        for name, kwargs, size in (
            ("resnet34", {"num_classes": 10, "width": args.width}, 32),
            ("unet", {"num_classes": 5, "width": args.unet_width}, 64),
        ):
            calls = {}
            for conv in ("regular", "deformable"):
                torch.manual_seed(0)
                model = MODELS.build(name, conv=CONVS.build(conv, placement="stages"), **kwargs).eval()
                x = torch.randn(1, 3, size, size)

                def forward(model=model, x=x) -> None:
                    with torch.no_grad():
                        model(x)

                calls[conv] = forward
            times = time_interleaved(calls, "cpu", rounds, _clock(args, threads))
            row = {"model": name, "image": size, "threads": threads, "width": kwargs["width"]}
            models.append(row | {f"{k}_ms": 1e3 * v for k, v in times.items()})
        print(f"  measured batch 1 at {threads} thread(s)", file=sys.stderr, flush=True)
    return {"layers": layers, "models": models, "summary": print_latency(layers, models, args.threads)}


def print_latency(layers: list[dict], models: list[dict], threads: int) -> dict:
    """Print the batch-1 tables; return the ratios the targets are stated in."""
    has_ort = "onnxruntime_ms" in layers[0]
    print("\nBatch 1, forward, milliseconds (median of interleaved rounds)\n")
    print("| layer | threads | ours | conv2d |" + (" onnxruntime |" if has_ort else "") + " ours/conv2d |")
    print("|---|---:|---:|---:|" + ("---:|" if has_ort else "") + "---:|")
    for r in layers:
        ort = f" {r['onnxruntime_ms']:.3f} |" if has_ort else ""
        print(
            f"| {r['family']} {r['layer']} | {r['threads']} | {r['ours_ms']:.3f} | {r['conv2d_ms']:.3f} |{ort} "
            f"{r['ours_ms'] / r['conv2d_ms']:.2f} |"
        )
    print("\n| model | threads | regular | deformable | deformable/regular |\n|---|---:|---:|---:|---:|")
    for r in models:
        print(
            f"| {r['model']} (width {r['width']}, {r['image']} px) | {r['threads']} | {r['regular_ms']:.2f} | "
            f"{r['deformable_ms']:.2f} | {r['deformable_ms'] / r['regular_ms']:.2f} |"
        )
    summary: dict = {}
    for family in dict.fromkeys(r["family"] for r in layers):
        at = {t: [r for r in layers if r["family"] == family and r["threads"] == t] for t in (1, threads)}
        summary[family] = {
            f"fwd_time_vs_conv2d_geomean_{threads}_threads": geomean(
                [r["ours_ms"] / r["conv2d_ms"] for r in at[threads]]
            ),
            f"speedup_1_to_{threads}_threads_geomean": geomean(
                [a["ours_ms"] / b["ours_ms"] for a, b in zip(at[1], at[threads], strict=True)]
            ),
        }
        if has_ort:
            summary[family][f"fwd_time_vs_onnxruntime_geomean_{threads}_threads"] = geomean(
                [r["ours_ms"] / r["onnxruntime_ms"] for r in at[threads]]
            )
    print("\nSummary:", json.dumps(summary, indent=2))
    return summary


def geomean(values: list[float]) -> float:
    """Geometric mean of positive values."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def print_tables(layers: list[dict], training: list[dict], device: str) -> dict:
    """Print the tables and return the summary ratios."""
    impls = [n for n in ("ours", "torchvision", "reference", "conv2d") if f"{n}_fwd_ms" in layers[0]]
    head = " | ".join(f"{n} fwd" for n in impls) + (" | onnxruntime fwd" if "onnxruntime_fwd_ms" in layers[0] else "")
    print(f"\nPer layer, {device}: milliseconds (median of interleaved rounds)\n")
    print(f"| layer | batch | {head} | " + " | ".join(f"{n} fwd+bwd" for n in impls) + " | f+b ours/conv2d |")
    print("|---" * (3 + 2 * len(impls) + ("onnxruntime_fwd_ms" in layers[0])) + "|")
    for r in layers:
        cells = [f"{r[f'{n}_fwd_ms']:.1f}" for n in impls]
        if "onnxruntime_fwd_ms" in r:
            cells.append(f"{r['onnxruntime_fwd_ms']:.1f}")
        cells += [f"{r[f'{n}_fwdbwd_ms']:.1f}" for n in impls]
        cells.append(f"{r['ours_fwdbwd_ms'] / r['conv2d_fwdbwd_ms']:.2f}")
        print(f"| {r['family']} {r['layer']} | {r['batch']} | " + " | ".join(cells) + " |")
    if any(k.endswith("_peak_mb") for k in layers[0]):
        print("\nPeak extra memory of one forward+backward (MiB)\n")
        print("| layer | " + " | ".join(impls) + " |")
        print("|---" * (1 + len(impls)) + "|")
        for r in layers:
            cells = [f"{r.get(f'{n}_peak_mb', math.nan):.0f}" for n in impls]
            print(f"| {r['family']} {r['layer']} | " + " | ".join(cells) + " |")
    summary: dict = {}
    for family in dict.fromkeys(r["family"] for r in layers):
        rows = [r for r in layers if r["family"] == family]
        summary[family] = {
            "fwdbwd_speedup_vs_torchvision_geomean": geomean(
                [r["torchvision_fwdbwd_ms"] / r["ours_fwdbwd_ms"] for r in rows]
            )
            if "torchvision" in impls
            else None,
            "fwdbwd_time_vs_conv2d_geomean": geomean([r["ours_fwdbwd_ms"] / r["conv2d_fwdbwd_ms"] for r in rows]),
            "fwd_time_vs_conv2d_geomean": geomean([r["ours_fwd_ms"] / r["conv2d_fwd_ms"] for r in rows]),
        }
    if "onnxruntime_fwd_ms" in layers[0]:
        summary["fwd_time_vs_onnxruntime_per_layer"] = [r["ours_fwd_ms"] / r["onnxruntime_fwd_ms"] for r in layers]
    if "torchvision_peak_mb" in layers[0] and "ours_peak_mb" in layers[0]:
        summary["peak_memory_vs_torchvision_per_layer"] = [
            r["ours_peak_mb"] / r["torchvision_peak_mb"] if r["torchvision_peak_mb"] > 0 else math.nan for r in layers
        ]
    summary["layers"] = [f"{r['family']}:{r['layer']}" for r in layers]
    if training:
        print(f"\nEnd to end: ResNet-34 (width {training[0]['width']}) training, batch {training[0]['batch']}\n")
        print("| conv | placement | img/s | vs regular |")
        print("|---|---|---:|---:|")
        for r in training:
            print(f"| {r['conv']} | {r['placement']} | {r['img_s']:.1f} | {r['throughput_vs_regular']:.2f} |")
        summary["train_throughput_vs_regular"] = {
            f"{r['conv']}/{r['placement']}": r["throughput_vs_regular"] for r in training
        }
    print("\nSummary:", json.dumps(summary, indent=2))
    return summary


def main() -> int:
    """Parse arguments, run the benchmarks, print tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and ONNX Runtime)")
    parser.add_argument("--batch", type=int, default=32, help="ResNet-34 layers' batch; 1: latency mode (see above)")
    parser.add_argument("--unet-batch", type=int, default=16, help="batch of the U-Net layer shapes")
    parser.add_argument("--unet-width", type=int, default=8, help="U-Net base width for --batch 1's whole model")
    parser.add_argument("--skip-unet", action="store_true", help="ResNet-34 layer shapes only")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--width", type=int, default=64, help="ResNet-34 base width for the training benchmark")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow pure-PyTorch fallback")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="thread: time 1-thread calls by the calling thread's CPU time, which other processes on a shared "
        "machine do not inflate (needs --threads 1, except with --batch 1, whose 1-thread pass uses it)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_deform.json"))
    args = parser.parse_args()
    if args.clock == "thread" and (args.device != "cpu" or (args.threads != 1 and args.batch != 1)):
        print("error: --clock thread times one CPU thread; use it with --threads 1 or --batch 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    environment = {
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "git_commit": _git_commit(),
    }
    if args.batch == 1:
        if args.device != "cpu":
            print("error: --batch 1 (latency mode) measures CPU inference; drop --device cuda", file=sys.stderr)
            return 2
        payload = environment | {"mode": "batch1-latency", "clock_1_thread": args.clock} | bench_latency(args)
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.out}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    layers = bench_layers(args)
    training = [] if args.skip_training else bench_training(args)
    summary = print_tables(layers, training, args.device)
    payload = {
        "git_commit": environment["git_commit"],
        "clock": args.clock,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "layers": layers,
        "training": training,
        "summary": summary,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _git_commit() -> dict[str, str | None]:
    """The checkout's commit and the SHA-256 of the C++ sources that ran (JSON files are compared
    across commits; the source hash also tells apart uncommitted kernel edits): the kernel's, and
    the op's C++ CPU and autograd kernels'."""
    here = Path(__file__).resolve().parent
    ops = here.parent / "dcn_experiments" / "ops"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        head = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {
        "commit": head,
        "kernel_source_sha256": digest(ops / "deform_conv2d_cpu.cpp"),
        "op_source_sha256": digest(ops / "deform_conv2d_op.cpp"),
    }


if __name__ == "__main__":
    sys.exit(main())
