"""metrics.json: the per-run record that the report and users read (schema in SPEC.md)."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

RUN_METRICS_FILE = "metrics.json"


def summarize_run(
    identity: dict[str, Any], epochs: list[dict[str, Any]], metric_key: str, details: dict[str, Any]
) -> dict[str, Any]:
    """The metrics.json payload: identity fields, per-epoch history, final values at top level.

    ``epoch_time_s`` and ``train_throughput_img_s`` at top level are medians over epochs (robust
    to a slow first epoch); the metric and loss are the last epoch's.
    """
    last = epochs[-1] if epochs else {}
    summary = {
        **identity,
        "epochs": epochs,
        f"val_{metric_key}": last.get(f"val_{metric_key}", math.nan),
        f"train_{metric_key}": last.get(f"train_{metric_key}", math.nan),
        "val_loss": last.get("val_loss", math.nan),
        f"best_val_{metric_key}": max((e[f"val_{metric_key}"] for e in epochs), default=math.nan),
        "epoch_time_s": statistics.median(e["epoch_time_s"] for e in epochs) if epochs else math.nan,
        "train_throughput_img_s": statistics.median(e["train_throughput_img_s"] for e in epochs) if epochs else 0.0,
        **details,
    }
    return summary


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON via a temp file + rename (NaN written as null)."""
    text = json.dumps(_nan_to_none(payload), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
