#!/usr/bin/env python
"""CPU scaling table: what 2 DDP processes, 2 parallel joblib jobs, bf16 and channels-last do to
training throughput, for the regular and the deformable arm.

Every configuration is a real ``dcn-train`` run (a subprocess) of a small ResNet-34 on the embedded
shapes set; throughput is the last epoch's (the first pays for warm-up), in images per second over
all processes. Configurations run round-robin, ``--rounds`` times, and the table gives medians and
ratios to the same arm's 1-process float32 run measured in the same rounds: on a machine shared with
other work only the ratios mean something. The joblib rows run both arms as one sweep with
``n_jobs`` 1 and 2 and compare the sweep's wall time.

    python scripts/bench_scaling.py                    # prints the table, writes bench_scaling.json
    python scripts/bench_scaling.py --rounds 1 --batches 2
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


def _run(prefix: tuple[str, ...], overrides: list[str], cwd: Path) -> float:
    command = [sys.executable, *prefix, "-m", "dcn_experiments.train", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return wall


def _throughput(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"][-1]["train_throughput_img_s"]


def main() -> None:
    """Run the rounds, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3, help="training batches per epoch")
    parser.add_argument("--batch", type=int, default=32, help="global batch (DDP: half per process)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench_scaling.json"))
    args = parser.parse_args()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for round_ in range(args.rounds):
            for arm in ARMS:
                for name, (prefix, extra) in CONFIGS.items():
                    batch = args.batch // 2 if name == "ddp2" else args.batch
                    run_dir = work / f"{round_}_{arm}_{name}"
                    overrides = [*_base(args), f"conv={arm}", f"dataset.batch_size={batch}", *extra]
                    _run(prefix, [*overrides, f"hydra.run.dir={run_dir}"], work)
                    samples.setdefault(f"{arm}/{name}", []).append(_throughput(run_dir))
                    print(f"round {round_} {arm:10s} {name:13s} {samples[f'{arm}/{name}'][-1]:8.1f} img/s", flush=True)
            for jobs in (1, 2):
                sweep = work / f"{round_}_joblib{jobs}"
                overrides = [*_base(args), f"dataset.batch_size={args.batch}", "conv=regular,deformable"]
                launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={sweep}"]
                wall = _run((), ["-m", *launcher, *overrides], work)
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
        "sweep_wall_s": walls,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
