"""The run record (``metrics.json``): its file name, schema version, status values, headline metric.

This module is the one place that knows how a run is recorded; the engine writes records through
it, and ``train.py`` and the report read them through it. Schema (version 2):

* identity: ``task, model, conv, dataset, seed, params, placement, conv_version, ...``
* ``schema_version``; ``status``: ``completed`` | ``diverged`` | ``failed`` (+ ``reason``, one line)
* ``epochs``: per-epoch dicts; final values at top level: ``val_acc`` or ``val_miou`` (the
  headline metric, see :func:`headline_metric`), ``val_loss``, ``epoch_time_s``,
  ``train_throughput_img_s``.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Any

from dcn_experiments.atomic import atomic_write_text

RUN_RECORD_FILE = "metrics.json"
ROBUSTNESS_FILE = "robustness.json"  # dcn-eval's results, beside the run record
SCHEMA_VERSION = 2
COMPLETED, DIVERGED, FAILED = "completed", "diverged", "failed"
STATUSES = (COMPLETED, DIVERGED, FAILED)
# The headline metric of each task, as the short name the task's metric computes.
HEADLINE_METRIC_OF_TASK = {"classification": "acc", "segmentation": "miou"}


class RunRecordError(ValueError):
    """A ``metrics.json`` that cannot be read as a run record (corrupt, truncated, not an object)."""


def headline_metric(record: dict[str, Any]) -> str:
    """The record's headline key: ``val_acc`` (classification) or ``val_miou`` (segmentation)."""
    short = HEADLINE_METRIC_OF_TASK.get(record.get("task", ""))
    if short is None:  # a record without a known task: go by what it holds
        short = "miou" if "val_miou" in record else "acc"
    return f"val_{short}"


def headline_value(record: dict[str, Any]) -> float:
    """The final headline metric as a float (NaN when the run produced none)."""
    value = record.get(headline_metric(record))
    return float(value) if isinstance(value, int | float) else math.nan


def summarize_run(
    identity: dict[str, Any],
    epochs: list[dict[str, Any]],
    metric_key: str,
    details: dict[str, Any],
    diverged: bool = False,
) -> dict[str, Any]:
    """The record of a run that trained: identity, per-epoch history, final values at top level.

    ``epoch_time_s`` and ``train_throughput_img_s`` at top level are medians over epochs (robust
    to a slow first epoch); the metric and loss are the last epoch's.
    """
    last = epochs[-1] if epochs else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "status": DIVERGED if diverged else COMPLETED,
        **identity,
        "epochs": epochs,
        f"val_{metric_key}": last.get(f"val_{metric_key}", math.nan),
        f"train_{metric_key}": last.get(f"train_{metric_key}", math.nan),
        "val_loss": last.get("val_loss", math.nan),
        f"best_val_{metric_key}": max((e[f"val_{metric_key}"] for e in epochs), default=math.nan),
        "epoch_time_s": statistics.median(e["epoch_time_s"] for e in epochs) if epochs else math.nan,
        "train_throughput_img_s": statistics.median(e["train_throughput_img_s"] for e in epochs) if epochs else 0.0,
        "diverged": diverged,
        **details,
    }


def failed_record(identity: dict[str, Any], reason: str) -> dict[str, Any]:
    """The record of a run that did not finish: what it was, and why it failed (one line)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": FAILED,
        "reason": " ".join(reason.split()),
        **identity,
        "epochs": [],
    }


def write_run_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``run_dir/metrics.json`` (atomically); return the path."""
    path = run_dir / RUN_RECORD_FILE
    write_json_atomic(path, record)
    return path


def record_failure(run_dir: Path, identity: dict[str, Any], reason: str) -> dict[str, Any]:
    """Record a failed run in ``run_dir`` and return the record; a ``metrics.json`` already there
    (the user's, or an earlier run's) is never overwritten by a failure."""
    record = failed_record(identity, reason)
    if run_dir.is_dir() and not (run_dir / RUN_RECORD_FILE).exists():
        # an unwritable folder: the error itself says so; there is nothing more to record
        with contextlib.suppress(OSError):
            write_run_record(run_dir, record)
    return record


def read_run_record(path: Path) -> dict[str, Any]:
    """Read a ``metrics.json``; :class:`RunRecordError` names the file when it is not a record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunRecordError(f"{path}: unreadable run record ({error})") from error
    if not isinstance(record, dict):
        raise RunRecordError(f"{path}: a run record must be a JSON object, found {type(record).__name__}")
    record.setdefault("schema_version", 1)
    record.setdefault("status", DIVERGED if record.get("diverged") else COMPLETED)
    return record


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON via a temp file in the same folder, fsync and rename (NaN written as null)."""
    atomic_write_text(path, json.dumps(_nan_to_none(payload), indent=2) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
