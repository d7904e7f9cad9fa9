"""Issue 14's crash matrix: one training step of every model/arm/placement/width/batch/layout.

Each case runs in a worker subprocess, so a native crash (oneDNN #6035: SIGSEGV or "double free or
corruption" in the strided 1x1 convolution's channels-last backward) fails that case with the
signal's name instead of killing pytest; the worker is restarted for the remaining cases.
Channels-last cases also check that every gradient equals the NCHW one (the same bug can produce
wrong weight gradients without crashing).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcn_experiments.engine import describe_exit

WORKER = Path(__file__).with_name("crash_matrix_worker.py")
THREADS = 2  # the crash needs more than one oneDNN thread

MODEL_CASES = [
    {
        "kind": "model",
        "model": model,
        "conv": conv,
        "placement": placement,
        "width": width,
        "batch": batch,
        "layout": layout,
    }
    for model, (conv, placement), width, batch, layout in itertools.product(
        ("resnet34", "unet"),
        (("regular", "stages"), ("deformable", "stages"), ("deformable", "all")),
        (8, 16),
        (1, 13, 29, 64),
        ("nchw", "channels_last"),
    )
]  # regular ignores placement: one regular case per geometry
LAYER_CASES = [
    {"kind": "layer", "in_channels": channels, "batch": batch, "layout": "channels_last"}
    for channels, batch in itertools.product((3, 8, 12, 16), (1, 13, 16, 29, 64))
]
CASES = {"-".join(str(v) for k, v in case.items() if k != "kind"): case for case in MODEL_CASES + LAYER_CASES}


def _describe_death(returncode: int, stderr: str) -> str:
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return f"worker {describe_exit(returncode)} ({tail})"


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str | None]:
    """case id -> None (passed) or the failure, running all cases in as few workers as possible."""
    results: dict[str, str | None] = {}
    pending = [{"id": key, **case} for key, case in CASES.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    while pending:
        process = subprocess.run(
            [sys.executable, str(WORKER), str(THREADS)],
            input=json.dumps(pending),
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        started = None
        for line in process.stdout.splitlines():
            event = json.loads(line)
            if "start" in event:
                started = event["start"]
            else:
                results[event["done"]] = event["error"]
                started = None
        if started is None and process.returncode != 0:
            # died before the first case or between cases: charge the next pending case
            started = next(case["id"] for case in pending if case["id"] not in results)
        if started is not None:
            results[started] = _describe_death(process.returncode, process.stderr)
        pending = [case for case in pending if case["id"] not in results]
    return results


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_one_training_step_survives(outcomes: dict[str, str | None], case_id: str) -> None:
    assert outcomes[case_id] is None, outcomes[case_id]
