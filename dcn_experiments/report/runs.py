"""Find the runs of one or more sweep folders; keep every run, also those that cannot be compared."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from dcn_experiments.engine.results import (
    COMPLETED,
    DIVERGED,
    FAILED,
    ROBUSTNESS_FILE,
    RUN_RECORD_FILE,
    RunRecordError,
    read_run_record,
)

log = logging.getLogger(__name__)
MISSING, UNREADABLE = "missing", "unreadable"


def collect_runs(sweep_dirs: Path | Sequence[Path]) -> list[dict[str, Any]]:
    """Every run below the sweep folder(s), each record with ``run_dir``, ``overrides`` and ``robustness`` added.

    A run is a folder with a ``metrics.json`` or a Hydra job folder (``.hydra/``). Runs that cannot
    be compared are kept, never skipped: a job folder without a record gets ``status: missing``, a
    corrupt record ``status: unreadable``, each with a ``reason``. ``run_dir`` is relative to its
    sweep folder, prefixed by that folder's name when several folders are given; a run reached
    through two of the given folders is listed once.
    """
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, str | Path) else [Path(d) for d in sweep_dirs]
    labels = sweep_labels(dirs)
    sweeps = {d.resolve() for d in dirs}
    seen: set[Path] = set()
    runs = []
    for sweep_dir, label in zip(dirs, labels, strict=True):
        for folder in _run_folders(sweep_dir, exclude=sweeps):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            run = _read_run(folder)
            relative = str(folder.relative_to(sweep_dir))
            run["run_dir"] = f"{label}/{relative}" if len(dirs) > 1 else relative
            run["sweep"] = label
            runs.append(run)
    return runs


def sweep_labels(dirs: Sequence[Path]) -> list[str]:
    """Short names of the sweep folders: their names, or their paths as given when two names clash."""
    names = [d.name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def _run_folders(sweep_dir: Path, exclude: set[Path]) -> list[Path]:
    folders = {p.parent for p in sweep_dir.rglob(RUN_RECORD_FILE)}
    folders |= {p.parent for p in sweep_dir.rglob(".hydra") if (p / "overrides.yaml").is_file()}
    # a sweep folder's own .hydra is not a job; natural order puts job 2 before job 10
    return sorted((f for f in folders if f.resolve() not in exclude), key=_natural)


def _natural(path: Path) -> list[tuple[int, Any]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", path.as_posix())]


def _read_run(folder: Path) -> dict[str, Any]:
    path = folder / RUN_RECORD_FILE
    if not path.is_file():
        run: dict[str, Any] = {"status": MISSING, "reason": f"no {RUN_RECORD_FILE}: the job never finished"}
    else:
        try:
            run = read_run_record(path)
        except RunRecordError as error:
            run = {"status": UNREADABLE, "reason": str(error)}
    run["overrides"] = shared_overrides(folder / ".hydra" / "overrides.yaml")
    run["robustness"], run["robustness_error"] = _read_robustness(folder / ROBUSTNESS_FILE)
    return run


def _read_robustness(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("auc", {}), dict):
            raise ValueError("not a robustness record (an object with 'axes' and 'auc')")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"{path}: unreadable robustness record ({error})"
    return data, None


# Overrides that do not change what is trained: runs differing only in these are one setting.
NOT_A_SETTING = ("conv=", "seed=", "hydra.", "report.", "trainer.progress=", "trainer.resume=")


def shared_overrides(overrides_file: Path) -> list[str]:
    """The command-line overrides both arms of a pair must share: all but ``conv=``, ``seed=``
    (the seed is a column of its own), Hydra's own settings and keys that do not change training
    (``report.*``, progress bars, resume). ``conv.*`` keys stay here; the grouping treats them as
    deformable-only settings. Values are normalised (``True``/``true``, ``1e-3``/``0.001``), since
    a sweep and a single run spell the same value differently."""
    if not overrides_file.is_file():
        return []
    overrides = [_normalised(str(o)) for o in OmegaConf.to_container(OmegaConf.load(overrides_file))]
    return sorted(o for o in overrides if not override_key(o).startswith(NOT_A_SETTING))


def _normalised(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep:
        return override
    for number in (int, float):
        try:
            return f"{key}={number(value)!r}"
        except ValueError:
            pass
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return override
    if isinstance(parsed, bool):
        return f"{key}={str(parsed).lower()}"
    return override


def override_key(override: str) -> str:
    """The override without its ``+``/``++``/``~`` prefix, e.g. ``conv.placement=all``."""
    return override.lstrip("+~")


def completed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that completed: the ones statistics are computed from."""
    return [r for r in runs if r.get("status") == COMPLETED]


def trained(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that trained (completed or diverged): the ones with numbers to show."""
    return [r for r in runs if r.get("status") in (COMPLETED, DIVERGED)]


def diverged_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose loss became non-finite: reported, excluded from statistics."""
    return [r for r in runs if r.get("status") == DIVERGED]


def failed_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that failed, are missing their record, or whose record is unreadable."""
    return [r for r in runs if r.get("status") in (FAILED, MISSING, UNREADABLE)]
