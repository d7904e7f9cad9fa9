"""The sweep report pairs each deformable run with the regular run of the same setting."""

from __future__ import annotations

import json
from pathlib import Path

from dcn_experiments.report.compare import collect_runs, pair_ratios, render_markdown


def _write_run(sweep: Path, name: str, conv: str, overrides: list[str], val_acc: float) -> None:
    run_dir = sweep / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {
        "task": "classification",
        "model": "resnet34",
        "dataset": "shapes",
        "seed": 0,
        "conv": conv,
        "placement": "stages",
        "params": 100 if conv == "regular" else 120,
        "val_acc": val_acc,
        "epoch_time_s": 1.0 if conv == "regular" else 2.0,
        "train_throughput_img_s": 10.0,
        "epochs": [],
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_runs_differing_in_another_override_are_not_paired_across_it(tmp_path: Path) -> None:
    for num, (conv, lr, acc) in enumerate(
        [("regular", "0.001", 0.5), ("regular", "0.01", 0.3), ("deformable", "0.001", 0.6), ("deformable", "0.01", 0.2)]
    ):
        _write_run(tmp_path, f"{num}_{conv}", conv, [f"conv={conv}", f"trainer.lr={lr}", "seed=0"], acc)
    pairs = pair_ratios(collect_runs(tmp_path))
    by_setting = {p["overrides"]: (p["regular"], p["deformable"]) for p in pairs}
    assert by_setting == {"trainer.lr=0.001": (0.5, 0.6), "trainer.lr=0.01": (0.3, 0.2)}
    assert "| trainer.lr=0.01 | val_acc | 0.3000 | 0.2000 |" in render_markdown(collect_runs(tmp_path), [])


def test_a_sweep_without_a_matching_regular_run_says_so(tmp_path: Path) -> None:
    _write_run(tmp_path, "0_regular", "regular", ["conv=regular", "trainer.lr=0.001"], 0.5)
    _write_run(tmp_path, "1_deformable", "deformable", ["conv=deformable", "trainer.lr=0.01"], 0.6)
    runs = collect_runs(tmp_path)
    assert pair_ratios(runs) == []
    assert "No regular/deformable pair" in render_markdown(runs, [])
