"""A sweep loses nothing to one job: errors and native crashes are recorded, the rest run, the
report names the failures, and the sweep exits non-zero (issues 8 and 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from dcn_experiments.engine import describe_exit, read_run_record
from dcn_experiments.report.compare import collect_runs, failed_runs, render_markdown

from .conftest import ONE_STEP

CRASH_SEED = 4242
# Loaded by every interpreter of the test's CLI run (the sweep and its job processes): a job
# process that seeds with CRASH_SEED dies of SIGSEGV, as a native kernel crash would.
SITECUSTOMIZE = f"""
import multiprocessing, os, random, signal
_seed = random.seed
def seed(a=None, *args, **kwargs):
    if a == {CRASH_SEED} and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGSEGV)
    return _seed(a, *args, **kwargs)
random.seed = seed
"""


def test_a_job_killed_by_a_signal_costs_only_itself(run_cli, tmp_path: Path) -> None:
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")]))
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "experiment=smoke",
        *ONE_STEP,
        "conv=regular,deformable",
        f"seed=0,{CRASH_SEED}",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": pythonpath},
    )
    assert result.returncode == 1, result.stderr
    records = {p.parent.name: read_run_record(p) for p in sweep.glob("*/metrics.json")}
    assert len(records) == 4, sorted(records)
    by_seed = {}
    for record in records.values():
        by_seed.setdefault(record["seed"], []).append(record)
    assert [r["status"] for r in by_seed[0]] == ["completed", "completed"]
    for record in by_seed[CRASH_SEED]:
        assert record["status"] == "failed"
        assert "killed by SIGSEGV" in record["reason"]
        assert record["conv"] in ("regular", "deformable") and record["model"] == "resnet34"
    report = (sweep / "report.md").read_text()
    assert "## Failed runs (2 of 4)" in report and report.count("killed by SIGSEGV") == 2
    assert "| resnet34 | shapes | 0 | stages |" in report  # the seed-0 pair is still compared
    assert "2 job(s) of this sweep did not finish" in result.stdout + result.stderr


def test_a_job_with_a_bad_value_fails_alone_with_its_one_line_reason(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "experiment=smoke", *ONE_STEP, "trainer.lr=-1,0.001", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    failed = read_run_record(sweep / "0_resnet34_regular" / "metrics.json")
    assert failed["status"] == "failed" and failed["reason"] == "trainer.lr=-1 must be a positive number"
    assert read_run_record(sweep / "1_resnet34_regular" / "metrics.json")["status"] == "completed"
    assert (
        "| 0_resnet34_regular | failed | trainer.lr=-1 must be a positive number |" in (sweep / "report.md").read_text()
    )


def test_report_names_failed_missing_and_corrupt_runs(tmp_path: Path) -> None:
    def job(name: str, record: str | None) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("- conv=regular\n")
        if record is not None:
            (tmp_path / name / "metrics.json").write_text(record)

    ok = {"task": "classification", "model": "resnet34", "conv": "regular", "seed": 0, "val_acc": 0.5, "epochs": []}
    job("0_ok", json.dumps(ok))
    job("1_failed", json.dumps({"status": "failed", "reason": "boom", "conv": "regular"}))
    job("2_missing", None)
    job("3_corrupt", '{"val_acc": 0.')
    runs = collect_runs(tmp_path)
    assert {r["run_dir"]: r["status"] for r in failed_runs(runs)} == {
        "1_failed": "failed",
        "2_missing": "missing",
        "3_corrupt": "unreadable",
    }
    text = render_markdown(runs, [])
    assert "## Failed runs (3 of 4)" in text
    assert "| 3_corrupt | unreadable |" in text and "3_corrupt/metrics.json: unreadable run record" in text
    assert "| 0_ok | resnet34 | regular |" in text


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV (segmentation fault)"
    assert describe_exit(-signal.SIGABRT) == "killed by SIGABRT (aborted)"
    assert describe_exit(2) == "exit code 2"


def test_two_sweeps_started_together_get_their_own_folders(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dcn_experiments.train", "-m", "experiment=smoke", "trainer.epochs=0"]
    sweeps = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    for sweep in sweeps:
        sweep.communicate(timeout=300)
    folders = sorted(p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    assert len(folders) == 2, folders
    for folder in folders:  # each holds exactly its own job, which failed on trainer.epochs=0
        records = list(folder.glob("*/metrics.json"))
        assert len(records) == 1 and read_run_record(records[0])["status"] == "failed"


def test_smoke_sweep_of_two_seeds_and_both_arms_with_robustness_writes_every_file(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "experiment=smoke",
        *ONE_STEP,
        "conv=regular,deformable",
        "seed=0,1",
        "report.robustness=true",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("report.md", "report.json", "curves.png", "cost.png", "differences.png", "robustness_by_arm.png"):
        assert (sweep / name).stat().st_size > 0, name
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 4
    for run in runs:
        record = read_run_record(run / "metrics.json")
        robustness = json.loads((run / "robustness.json").read_text())
        assert robustness["clean"] == record["val_acc"]  # strength 0 reproduces the run's own metric
        assert (run / "robustness.png").is_file()
        assert (run / "offsets_stages.3.2.conv2.png").is_file() == (record["conv"] == "deformable")
    report = json.loads((sweep / "report.json").read_text())
    (group,) = report["groups"]
    assert group["arms"]["regular"]["n"] == group["arms"]["deformable"]["n"] == 2
    assert group["difference"]["n"] == 2 and len(group["difference"]["ci95"]) == 2
    assert set(group["robustness"]) == {"rotation", "scale", "translation"}
    assert report["failed"] == []
