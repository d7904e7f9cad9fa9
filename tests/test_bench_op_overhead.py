"""``scripts/bench_op_overhead.py``: the op's C++ and Python dispatch paths, timed against the raw kernels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .conftest import import_script, run_script


def test_bench_op_overhead_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = run_script("bench_op_overhead.py", "--rounds", "1", "--layers", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["row"], r["phase"]) for r in rows] == [
        ("tiny 4ch@8", "fwd"),
        ("tiny 4ch@8", "f+b"),
        ("quick_seg U-Net step", "f+b"),
        ("U-Net w8 eval, batch 1", "fwd"),
        ("ResNet-34 eval, batch 1", "fwd"),
    ]
    assert all(r["op"] > 0 and r["op, Python kernels"] > 0 for r in rows)
    assert "| tiny 4ch@8 | f+b |" in result.stdout


def test_each_arm_runs_the_path_it_names() -> None:
    """Switched for the ``op`` arm, the calls are served by the C++ kernels (which count their calls,
    and whose autograd is a CppFunction); switched for the Python arm, they are not."""
    bench_op_overhead = import_script("bench_op_overhead")
    from dcn_experiments.ops import cpu_extension_available

    assert cpu_extension_available()
    calls = bench_op_overhead.layer_calls(4, 8, 1)
    native = torch.ops.dcn_experiments_cpu.public_op_calls
    try:
        for arm, served_in_cpp in (("op", True), ("op, Python kernels", False)):
            bench_op_overhead.set_kernels_for(arm)
            for phase in ("fwd", "f+b"):
                before = sum(native())
                out = calls[(arm, phase)]()
                assert sum(native()) - before == (1 if served_in_cpp else 0), (arm, phase)
                if phase == "f+b":
                    assert (type(out.grad_fn).__name__ == "CppFunction") == served_in_cpp
    finally:
        bench_op_overhead.set_kernels_for("op")
    times = bench_op_overhead.time_interleaved(calls, 1, time.perf_counter)
    assert set(times) == set(calls)
    assert torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(True) is True  # timing restores the C++ kernels


def test_bench_op_overhead_rejects_thread_clock_on_two_threads(tmp_path: Path) -> None:
    result = run_script("bench_op_overhead.py", "--threads", "2", "--out", str(tmp_path / "x.json"), timeout=120)
    assert result.returncode == 2 and "--clock thread measures the calling thread only" in result.stderr
    assert not (tmp_path / "x.json").exists()
