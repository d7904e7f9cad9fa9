"""``dcn-report SWEEP_DIR [SWEEP_DIR ...]``: regenerate report.md, report.json and plots of finished sweeps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcn_experiments.cli import exit_on_user_error
from dcn_experiments.report.compare import REPORT_FILE, REPORT_JSON, write_report


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the report, print it; warnings and failed runs also go to stderr."""
    parser = argparse.ArgumentParser(prog="dcn-report", description=__doc__)
    parser.add_argument(
        "sweep_dirs",
        type=Path,
        nargs="+",
        metavar="SWEEP_DIR",
        help="folder written by `dcn-train -m ...` (hydra.sweep.dir); several are merged",
    )
    parser.add_argument(
        "--output", type=Path, default=None, metavar="DIR", help="report folder (default: the first SWEEP_DIR)"
    )
    args = parser.parse_args(argv)
    report = write_report(args.sweep_dirs, args.output)
    sys.stdout.write(report.markdown)
    for warning in report.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    for run in report.failed:
        sys.stderr.write(f"not finished: {run['run_dir']} ({run['status']}: {run.get('reason')})\n")
    sys.stderr.write(f"wrote {report.output_dir / REPORT_FILE} and {report.output_dir / REPORT_JSON}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
