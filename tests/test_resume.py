"""Checkpoints and resume: a run killed mid-epoch and resumed ends exactly where an uninterrupted run
ends (weights compared at atol 0), TensorBoard has each epoch once, and bad resumes are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import assert_one_line_error

# 6 steps per epoch, 2 epochs, a step checkpoint every 2 steps: last.pt is written at global steps
# 2, 4, 6 (epoch end), 8, 10, 12 (epoch end).
RUN = (
    "experiment=smoke",
    "conv=deformable",
    "trainer.limit_train_batches=6",
    "trainer.checkpoint_every_n_steps=2",
    "dataset.batch_size=8",
)
# Loaded by the CLI's interpreter: SIGKILL right after the N-th last.pt was put in place.
KILLER = """
import os, signal
_replace, _count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if str(dst).endswith("last.pt"):
        _count[0] += 1
        if _count[0] == int(os.environ["KILL_AFTER_CHECKPOINTS"]):
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")


def _history(run_dir: Path) -> list[dict]:
    timing = {"epoch_time_s", "train_throughput_img_s", "data_time_s", "val_time_s"}
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in e.items() if k not in timing} for e in epochs]


def _scalar_steps(run_dir: Path, tag: str) -> list[int]:
    steps = []
    for events in sorted((run_dir / "tb").glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(run_cli, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert run_cli(*RUN, f"hydra.run.dir={straight}").returncode == 0

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent(KILLER))
    resumed = tmp_path / "resumed"
    killed = run_cli(
        *RUN,
        f"hydra.run.dir={resumed}",
        env={"PYTHONPATH": str(tmp_path / "inject"), "KILL_AFTER_CHECKPOINTS": "4"},
    )
    assert killed.returncode == -signal.SIGKILL
    stopped_at = _final_state(resumed)
    assert (stopped_at["epoch"], stopped_at["step"], stopped_at["step_in_epoch"]) == (1, 8, 2)  # mid-epoch 2
    assert not (resumed / "metrics.json").exists()

    result = run_cli(*RUN, f"hydra.run.dir={resumed}", "trainer.resume=auto")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in (resumed / "train.log").read_text()

    a, b = _final_state(straight), _final_state(resumed)
    assert (b["epoch"], b["step"]) == (a["epoch"], a["step"]) == (2, 12)
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name  # atol 0
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert _history(resumed) == _history(straight)
    assert _scalar_steps(resumed, "train/loss") == [1, 2]  # each epoch once, none missing
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"].endswith("last.pt")


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "DCN_DATA_ROOT": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dcn_experiments.train", "experiment=smoke", "trainer.epochs=50"]
    command += ["trainer.limit_train_batches=null", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.pt").exists():  # training has started
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in out + err
    log = (run_dir / "train.log").read_text()
    assert "stopped by SIGTERM" in log and f"trainer.resume=auto hydra.run.dir={run_dir.resolve()}" in log
    state = _final_state(run_dir)
    assert state["epoch"] < 50 and state["step"] > 0


def _task_config(compose_cfg, *overrides: str):
    """The config a task function receives (without the ``hydra`` node)."""
    from omegaconf import open_dict

    cfg = compose_cfg(*overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _nan_on_training_batch(monkeypatch, number: int) -> None:
    """Make the ``number``-th training loss of the run NaN."""
    from dcn_experiments.tasks.classification import Classification

    calls = {"n": 0}
    loss = Classification.loss

    def patched(self, logits, target):
        value = loss(self, logits, target)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == number:
                return value * float("nan")
        return value

    monkeypatch.setattr(Classification, "loss", patched)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, monkeypatch) -> None:
    from dcn_experiments.train import train

    _nan_on_training_batch(monkeypatch, 5)  # epoch 2 (3 batches per epoch), its 2nd step
    monkeypatch.setenv("DCN_DATA_ROOT", str(tmp_path / "data"))
    record = train(_task_config(compose_cfg, "experiment=smoke", "trainer.epochs=3"), tmp_path)
    assert record["status"] == "diverged"
    assert "non-finite loss (nan) in epoch 2 at step 2" in record["reason"]
    state = _final_state(tmp_path)
    assert (state["epoch"], state["step"]) == (1, 3)  # epoch 1's checkpoint, not overwritten
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [e["epoch"] for e in record["epochs"]] == [1]


def test_skip_nonfinite_counts_instead_of_stopping(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    from dcn_experiments.train import train

    _nan_on_training_batch(monkeypatch, 2)
    monkeypatch.setenv("DCN_DATA_ROOT", str(tmp_path / "data"))
    cfg = _task_config(compose_cfg, "experiment=smoke", "trainer.skip_nonfinite=true", "trainer.epochs=1")
    record = train(cfg, tmp_path)
    assert record["status"] == "completed" and record["skipped_nonfinite_batches"] == 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [("model.width=16", "model.width=8"), ("conv=regular", "conv.name='deformable'")],
)
def test_resuming_another_experiment_is_refused(run_cli, smoke_run, tmp_path: Path, change: str, fragment: str) -> None:
    first, _ = smoke_run  # experiment=smoke conv=deformable, finished
    result = run_cli(
        "experiment=smoke", "conv=deformable", change, f"trainer.resume={first}", f"hydra.run.dir={tmp_path / 'b'}"
    )
    assert_one_line_error(result, "cannot resume", fragment)


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_truncated_or_foreign_checkpoint_is_refused(
    run_cli, request: pytest.FixtureRequest, tmp_path: Path, damage: str
) -> None:
    checkpoint = tmp_path / "last.pt"
    if damage == "truncated":
        finished, _ = request.getfixturevalue("smoke_run")  # experiment=smoke conv=deformable
        data = (finished / "checkpoints" / "last.pt").read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}}, checkpoint)
    result = run_cli(
        "experiment=smoke", "conv=deformable", f"trainer.resume={checkpoint}", f"hydra.run.dir={tmp_path / 'b'}"
    )
    assert_one_line_error(result, "cannot resume from", "start afresh")
