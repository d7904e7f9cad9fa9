"""Hydra launchers and sweepers: parallel joblib jobs with a thread budget and DataLoader workers,
submitit's local executor in one fixed sweep folder, the Optuna preset, and the folder pinning."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dcn_experiments.engine.launch import SWEEP_JOBS_ENV, concurrent_jobs, pin_output_dir
from dcn_experiments.engine.scale import available_cores

QUICK = (
    "experiment=smoke",
    "trainer.epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "dataset.train_size=32",
    "dataset.val_size=16",
    "dataset.batch_size=8",
)
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def _plugin(name: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{name}") is not None


def _records(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]


def test_concurrent_jobs_follow_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    def hydra(launcher: dict, sweeper: dict | None = None) -> object:
        return OmegaConf.create({"launcher": launcher, "sweeper": sweeper or {}})

    monkeypatch.setenv(SWEEP_JOBS_ENV, "4")
    assert concurrent_jobs(hydra({"_target_": JOBLIB, "n_jobs": 2})) == 2
    assert concurrent_jobs(hydra({"_target_": JOBLIB, "n_jobs": 8})) == 4  # no more than the sweep's jobs
    assert concurrent_jobs(hydra({"_target_": JOBLIB, "n_jobs": -1})) == min(4, available_cores())
    assert concurrent_jobs(hydra({"_target_": SUBMITIT_LOCAL})) == 4  # the local executor starts them all
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_jobs": 3}
    assert concurrent_jobs(hydra({"_target_": JOBLIB, "n_jobs": 8}, optuna)) == 3  # a batch of trials
    assert concurrent_jobs(hydra({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})) == 1


def test_a_sweep_folder_is_resolved_once_before_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWEEP_JOBS_ENV, raising=False)
    argv = ["-m", "conv=regular,deformable", "seed=0,1,2"]
    pinned = pin_output_dir(argv)
    assert pinned[:3] == argv and pinned[3].startswith("hydra.sweep.dir=multirun/") and "${" not in pinned[3]
    assert int(os.environ[SWEEP_JOBS_ENV]) == 6
    given = ["-m", "conv=regular,deformable", "hydra.sweep.dir=/tmp/fixed"]
    assert pin_output_dir(given) == given
    assert pin_output_dir(["conv=regular"]) == ["conv=regular"]  # one process: Hydra's own folder is fine


def test_optuna_preset_tunes_lr_and_offset_lr_mult(compose_cfg) -> None:
    if not _plugin("hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper is not installed (pip install 'dcn-experiments[scale]')")
    sweeper = compose_cfg("hydra/sweeper=optuna_lr").hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.n_trials > 0
    assert set(sweeper.params) == {"trainer.lr", "conv.offset_lr_mult"}


@pytest.mark.slow
def test_joblib_runs_two_arms_in_parallel_with_workers_and_a_thread_budget(run_cli, tmp_path: Path) -> None:
    if not _plugin("hydra_joblib_launcher"):
        pytest.skip("hydra-joblib-launcher is not installed (pip install 'dcn-experiments[scale]')")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *QUICK,
        "dataset.num_workers=1",  # DataLoader workers inside a joblib job (hydra#964)
        "conv=regular,deformable",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(sweep)
    assert sorted(r["conv"] for r in records) == ["deformable", "regular"]
    for record in records:
        assert record["status"] == "completed"
        assert record["environment"]["concurrent_jobs"] == 2
        assert record["environment"]["torch_threads"] == max(1, available_cores() // 2)
    assert "shared the machine" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_submitit_local_runs_a_job_in_one_fixed_sweep_folder(run_cli, tmp_path: Path) -> None:
    if not _plugin("hydra_submitit_launcher"):
        pytest.skip("hydra-submitit-launcher is not installed (pip install 'dcn-experiments[scale]')")
    result = run_cli("-m", "hydra/launcher=submitit_local", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps  # the launcher's .submitit folder and the job's run share it
    assert (sweeps[0] / ".submitit").is_dir()
    assert [r["status"] for r in _records(sweeps[0])] == ["completed"]
