#!/usr/bin/env python
"""Regenerate docs/example-report/: the README's "Reading the results" example.

Runs ``dcn-train -m conv=regular,deformable seed=0,1,2 experiment=quick report.robustness=true``
(about 15 minutes on 2 CPU cores) into a temporary sweep folder, then copies the sweep's
report.md, report.json and plots into docs/example-report/, with the first deformable run's offset
view and robustness plot (run folders are not copied: the checkpoints are large; report.json keeps
every number).

    python scripts/example_report.py [--sweep-dir DIR] [--out docs/example-report]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMAND = ["-m", "conv=regular,deformable", "seed=0,1,2", "experiment=quick", "report.robustness=true"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-dir", type=Path, help="keep the sweep here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "example-report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sweep = (args.sweep_dir or Path(scratch) / "sweep").resolve()
        run = subprocess.run([sys.executable, "-m", "dcn_experiments.train", *COMMAND, f"hydra.sweep.dir={sweep}"])
        if not (sweep / "report.md").is_file():
            print(f"error: the sweep wrote no report (exit code {run.returncode})", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.iterdir():
            old.unlink()
        for item in sorted(sweep.iterdir()):
            if item.suffix in (".md", ".json", ".png"):
                shutil.copy2(item, args.out / item.name)
        # one deformable run's offset view and robustness curves, as the README shows them
        first_deformable = next(iter(sorted(sweep.glob("*_deformable"))), None)
        if first_deformable is not None:
            for view in first_deformable.glob("offsets_*.png"):
                shutil.copy2(view, args.out / "offsets_example.png")
            if (first_deformable / "robustness.png").is_file():
                shutil.copy2(first_deformable / "robustness.png", args.out / "robustness_example.png")
        print(f"wrote {args.out} from {sweep} (sweep exit code {run.returncode})")
        return run.returncode


if __name__ == "__main__":
    sys.exit(main())
