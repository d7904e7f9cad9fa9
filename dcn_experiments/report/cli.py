"""``dcn-report SWEEP_DIR``: regenerate report.md and plots of a finished sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcn_experiments.cli import exit_on_user_error
from dcn_experiments.report.compare import REPORT_FILE, write_report


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the report, print it."""
    parser = argparse.ArgumentParser(prog="dcn-report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="folder written by `dcn-train -m ...` (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    text = write_report(args.sweep_dir)
    sys.stdout.write(text)
    sys.stderr.write(f"wrote {args.sweep_dir / REPORT_FILE}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
