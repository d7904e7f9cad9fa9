"""The sweep report: collect the runs of one or more sweeps, group and pair them, write md + json + PNGs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcn_experiments.atomic import atomic_write_text
from dcn_experiments.engine.results import RUN_RECORD_FILE, write_json_atomic
from dcn_experiments.errors import DataError
from dcn_experiments.report.plots import write_plots
from dcn_experiments.report.render import render_report, report_data
from dcn_experiments.report.runs import MISSING, UNREADABLE, collect_runs, failed_runs, sweep_labels, trained
from dcn_experiments.report.summary import group_runs, pair_rows

log = logging.getLogger(__name__)
REPORT_FILE, REPORT_JSON = "report.md", "report.json"

__all__ = [
    "MISSING",
    "REPORT_FILE",
    "REPORT_JSON",
    "UNREADABLE",
    "WrittenReport",
    "collect_runs",
    "failed_runs",
    "pair_ratios",
    "render_markdown",
    "trained",
    "write_report",
]


@dataclass
class WrittenReport:
    """What :func:`write_report` wrote: the folder, the markdown text and the ``report.json`` payload."""

    output_dir: Path
    markdown: str
    data: dict[str, Any]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The failed, missing and unreadable runs (``run_dir, status, reason``)."""
        return self.data["failed"]

    @property
    def warnings(self) -> list[str]:
        """Hardware/threads/backend mismatches, shared machines and unreadable robustness files."""
        return self.data["warnings"]


def pair_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group and seed with both arms completed: values, delta and deformable/regular ratios."""
    return pair_rows(group_runs(runs))


def render_markdown(all_runs: list[dict[str, Any]], plots: list[str], sweeps: Sequence[str] = ()) -> str:
    """The ``report.md`` text of ``all_runs`` (as :func:`collect_runs` returns them) linking ``plots``."""
    return render_report(report_data(all_runs, group_runs(all_runs), list(sweeps), plots))


def write_report(sweep_dirs: Path | Sequence[Path], output_dir: Path | None = None) -> WrittenReport:
    """Write ``report.md``, ``report.json`` and the plots of the runs below ``sweep_dirs``.

    They go into ``output_dir``, by default the first sweep folder. Several sweep folders are merged
    (runs of one setting from separate sweeps are pooled over their seeds).
    """
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, str | Path) else [Path(d) for d in sweep_dirs]
    if not dirs:
        raise DataError("no sweep folder given; pass the folder a `dcn-train -m` run wrote")
    for sweep_dir in dirs:
        if not sweep_dir.is_dir():
            raise DataError(f"sweep folder not found: {sweep_dir}; pass the folder a `dcn-train -m` run wrote")
    runs = collect_runs(dirs)
    if not runs:
        where = ", ".join(map(str, dirs))
        raise DataError(f"no {RUN_RECORD_FILE} found under {where}; is this a dcn-train multirun folder?")
    out = output_dir or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    plots = write_plots(groups, out)
    data = report_data(runs, groups, sweep_labels(dirs), plots)
    text = render_report(data)
    write_json_atomic(out / REPORT_JSON, data)
    atomic_write_text(out / REPORT_FILE, text)
    return WrittenReport(output_dir=out, markdown=text, data=data)
