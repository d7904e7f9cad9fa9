"""Hydra callback: write the comparison report into the sweep folder when a multirun ends."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dcn_experiments.errors import UserError
from dcn_experiments.report.compare import REPORT_FILE, write_report

log = logging.getLogger("dcn_experiments.report")


class ComparisonReportCallback(Callback):
    """On multirun end: ``report.md``, ``report.json`` + plots in ``hydra.sweep.dir``; the report is also logged.

    A sweep with a failed, missing or unreadable run still gets its report, then exits with code 1
    so that scripts and CI notice. Diverged runs are a result, not a failure: they are reported only.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
        except UserError as error:
            log.warning("no comparison report: %s", error)
            return
        log.info("comparison report: %s\n\n%s", sweep_dir / REPORT_FILE, report.markdown)
        for warning in report.warnings:
            log.warning(warning)
        if report.failed:
            names = ", ".join(f"{r['run_dir']} ({r['status']}: {r.get('reason')})" for r in report.failed)
            log.error("%d job(s) of this sweep did not finish: %s", len(report.failed), names)
            sys.exit(1)
