#!/usr/bin/env python
"""CPU scaling table: what 2 DDP processes, 2 parallel joblib jobs, bf16 and channels-last do to
training throughput, for the regular and the deformable arm.

Every configuration is a real ``dcn-train`` run (a subprocess) of a small ResNet-34 on the embedded
shapes set; throughput is the last epoch's (the first pays for warm-up), in images per second over
all processes. Configurations run round-robin, ``--rounds`` times, and the table gives medians and
ratios to the same arm's 1-process float32 run measured in the same rounds: on a machine shared with
other work only the ratios mean something. The joblib rows run both arms as one sweep with
``n_jobs`` 1 and 2 and compare the sweep's wall time.

Precision and layout are also timed the way that survives a busy machine: training steps of every
(arm, setting) interleaved in one process (``--steps`` rounds, medians), ratios to float32.

    python scripts/bench_scaling.py                    # prints the tables, writes bench_scaling.json
    python scripts/bench_scaling.py --rounds 1 --batches 2
    python scripts/bench_scaling.py --in-process-only  # the interleaved precision/layout table alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARMS = ("regular", "deformable")
# name -> (launcher prefix, extra overrides); dataset.batch_size is per process, so DDP halves it
CONFIGS = {
    "fp32": ((), ()),
    "bf16": ((), ("trainer.precision=bf16",)),
    "channels_last": ((), ("trainer.channels_last=true",)),
    "ddp2": (("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"), ("trainer.sync_batchnorm=true",)),
}


def _base(args: argparse.Namespace) -> list[str]:
    return [
        "experiment=smoke",
        f"model.width={args.width}",
        "trainer.epochs=2",
        f"trainer.limit_train_batches={args.batches}",
        "trainer.limit_val_batches=1",
        f"dataset.train_size={args.batch * args.batches}",
        "device=cpu",
    ]


def _run(prefix: tuple[str, ...], overrides: list[str], cwd: Path, threads: int | None) -> float:
    command = [sys.executable, *prefix, "-m", "dcn_experiments.train", *overrides]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return wall


def _throughput(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"][-1]["train_throughput_img_s"]


def interleaved_steps(args: argparse.Namespace) -> list[dict]:
    """Median seconds of one training step per arm and setting (fp32, bf16, channels-last), the
    settings timed in interleaved rounds in this process."""
    import torch.nn.functional as F

    from dcn_experiments.engine.precision import memory_format, resolve_precision
    from dcn_experiments.models import CONVS, MODELS

    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 8, (args.batch,), generator=generator)
    setups = {}
    for arm in ARMS:
        for name in ("fp32", "bf16", "channels_last"):
            torch.manual_seed(0)
            model = MODELS.build("resnet34", num_classes=8, conv=CONVS.build(arm), width=args.width)
            layout = memory_format(name == "channels_last")
            model.to(memory_format=layout)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            setups[(arm, name)] = (model, optimizer, resolve_precision("bf16" if name == "bf16" else "32", cpu), layout)

    def step(key: tuple[str, str]) -> float:
        model, optimizer, precision, layout = setups[key]
        inputs = images.contiguous(memory_format=layout)
        start = time.perf_counter()
        with precision.autocast(cpu):
            loss = F.cross_entropy(model(inputs).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for key in setups:  # warm-up (kernel build, allocator)
        step(key)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
    for _ in range(args.steps):
        for key in setups:
            times[key].append(step(key))
    rows = []
    for arm, name in setups:
        median = statistics.median(times[(arm, name)])
        base = statistics.median(times[(arm, "fp32")])
        regular = statistics.median(times[("regular", name)])
        rows.append(
            {
                "arm": arm,
                "config": name,
                "step_ms": 1e3 * median,
                "ratio_to_fp32": median / base,
                "deformable_over_regular": median / regular,
            }
        )
    print(f"\ninterleaved training steps (batch {args.batch}, width {args.width}, {torch.get_num_threads()} threads)")
    print(f"{'arm':10s} {'config':14s} {'ms/step':>8s} {'x fp32':>7s} {'x regular':>9s}")
    for row in rows:
        print(
            f"{row['arm']:10s} {row['config']:14s} {row['step_ms']:8.1f} {row['ratio_to_fp32']:7.2f} "
            f"{row['deformable_over_regular']:9.2f}"
        )
    return rows


def main() -> None:
    """Run the rounds, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3, help="training batches per epoch")
    parser.add_argument("--batch", type=int, default=32, help="global batch (DDP: half per process)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="interleaved rounds of training steps")
    parser.add_argument("--in-process-only", action="store_true", help="skip the subprocess (DDP, joblib) table")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every run (torchrun sets 1 per process anyway); 1 keeps a busy machine's "
        "OpenMP barriers from stalling, which makes 2-thread runs swing by 10x there",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_scaling.json"))
    args = parser.parse_args()
    steps = interleaved_steps(args)
    if args.in_process_only:
        payload = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "steps": steps}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
        return
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for round_ in range(args.rounds):
            for arm in ARMS:
                for name, (prefix, extra) in CONFIGS.items():
                    batch = args.batch // 2 if name == "ddp2" else args.batch
                    run_dir = work / f"{round_}_{arm}_{name}"
                    overrides = [*_base(args), f"conv={arm}", f"dataset.batch_size={batch}", *extra]
                    _run(prefix, [*overrides, f"hydra.run.dir={run_dir}"], work, args.threads)
                    samples.setdefault(f"{arm}/{name}", []).append(_throughput(run_dir))
                    print(f"round {round_} {arm:10s} {name:13s} {samples[f'{arm}/{name}'][-1]:8.1f} img/s", flush=True)
            for jobs in (1, 2):
                sweep = work / f"{round_}_joblib{jobs}"
                overrides = [*_base(args), f"dataset.batch_size={args.batch}", "conv=regular,deformable"]
                launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={sweep}"]
                wall = _run((), ["-m", *launcher, *overrides], work, args.threads)
                samples.setdefault(f"sweep/joblib{jobs}_wall_s", []).append(wall)
                for arm in ARMS:
                    (run_dir,) = sweep.glob(f"*_{arm}")
                    samples.setdefault(f"{arm}/joblib{jobs}", []).append(_throughput(run_dir))
                print(f"round {round_} joblib n_jobs={jobs}: sweep {wall:.1f} s", flush=True)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for arm in ARMS:
        base = medians[f"{arm}/fp32"]
        for name in (*CONFIGS, "joblib1", "joblib2"):
            value = medians[f"{arm}/{name}"]
            rows.append({"arm": arm, "config": name, "img_s": value, "ratio_to_fp32": value / base})
    print(f"\n{'arm':10s} {'config':14s} {'img/s':>8s} {'x fp32':>7s}")
    for row in rows:
        print(f"{row['arm']:10s} {row['config']:14s} {row['img_s']:8.1f} {row['ratio_to_fp32']:7.2f}")
    walls = {jobs: medians[f"sweep/joblib{jobs}_wall_s"] for jobs in (1, 2)}
    print(f"\nsweep of both arms: n_jobs=1 {walls[1]:.1f} s, n_jobs=2 {walls[2]:.1f} s ({walls[1] / walls[2]:.2f}x)")
    payload = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "samples": samples,
        "rows": rows,
        "steps": steps,
        "sweep_wall_s": walls,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
