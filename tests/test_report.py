"""The sweep report groups runs by setting, pairs the arms by seed and states a verdict with a 95% CI
(issue 8): numbers here are recomputed with ``statistics`` and a t quantile from a table."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from dcn_experiments.report import cli
from dcn_experiments.report.compare import collect_runs, pair_ratios, render_markdown, write_report
from dcn_experiments.report.summary import group_runs

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95% Student t quantiles, df = n - 1


def write_run(
    sweep: Path,
    name: str,
    conv: str,
    seed: int,
    value: float,
    *,
    overrides: tuple[str, ...] = (),
    epoch_time: float = 1.0,
    status: str = "completed",
    placement: str = "stages",
    environment: dict[str, Any] | None = None,
    backend: str | None = None,
    robustness: dict[str, float] | None = None,
) -> Path:
    """A Hydra job folder with ``overrides.yaml`` and a hand-written ``metrics.json``."""
    run_dir = sweep / name
    (run_dir / ".hydra").mkdir(parents=True)
    all_overrides = [f"conv={conv}", f"seed={seed}", *overrides]
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in all_overrides))
    metrics: dict[str, Any] = {
        "task": "classification",
        "model": "resnet34",
        "dataset": "shapes",
        "seed": seed,
        "conv": conv,
        "placement": placement,
        "conv_version": 2,
        "offset_lr_mult": 0.1,
        "params": 100 if conv == "regular" else 120,
        "flops_per_image": 1000 if conv == "regular" else 1500,
        "val_acc": value,
        "val_loss": 1.0,
        "epoch_time_s": epoch_time,
        "train_throughput_img_s": 10.0 / epoch_time,
        "status": status,
        "epochs": [
            {"epoch": e, "val_acc": value * (e + 1) / 2, "train_loss": 1.0 / (e + 1), "epoch_time_s": epoch_time}
            for e in range(2)
        ],
    }
    if environment is not None:
        metrics["environment"] = environment
    if backend is not None:
        metrics["deformable_backend"] = backend
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if robustness is not None:
        strengths = [0.0, 10.0, 20.0, 30.0, 40.0]
        axes = {
            axis: {"unit": "degrees", "strengths": strengths, "values": [auc] * len(strengths)}
            for axis, auc in robustness.items()
        }
        record = {"schema_version": 1, "metric": "val_acc", "clean": value, "axes": axes, "auc": robustness}
        (run_dir / "robustness.json").write_text(json.dumps(record))
    return run_dir


def write_pairs(sweep: Path, regular: list[float], deformable: list[float], **kwargs: Any) -> None:
    """Both arms for seeds 0..n-1 with the given headline values."""
    for seed, (r, d) in enumerate(zip(regular, deformable, strict=True)):
        write_run(sweep, f"{2 * seed}_resnet34_regular", "regular", seed, r, **kwargs)
        write_run(sweep, f"{2 * seed + 1}_resnet34_deformable", "deformable", seed, d, **kwargs)


def ci95(values: list[float]) -> tuple[float, float]:
    """The t interval of the mean, with the quantile from the table."""
    mean, n = statistics.mean(values), len(values)
    half = T_975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def numbers(text: str) -> list[float]:
    """The numbers in a sentence, e.g. ``[0.06, 0.035, 0.085, 3.0]``."""
    return [float(x) for x in re.findall(r"-?\d+\.?\d*", text)]


def test_runs_differing_in_another_override_are_not_paired_across_it(tmp_path: Path) -> None:
    for num, (conv, lr, acc) in enumerate(
        [("regular", "0.001", 0.5), ("regular", "0.01", 0.3), ("deformable", "0.001", 0.6), ("deformable", "0.01", 0.2)]
    ):
        write_run(tmp_path, f"{num}_{conv}", conv, 0, acc, overrides=(f"trainer.lr={lr}",))
    pairs = pair_ratios(collect_runs(tmp_path))
    by_setting = {p["overrides"]: (p["regular"], p["deformable"]) for p in pairs}
    assert by_setting == {"trainer.lr=0.001": (0.5, 0.6), "trainer.lr=0.01": (0.3, 0.2)}
    assert "| trainer.lr=0.01 | val_acc | 0.3000 | 0.2000 |" in render_markdown(collect_runs(tmp_path), [])


def test_a_sweep_without_a_matching_regular_run_says_so(tmp_path: Path) -> None:
    write_run(tmp_path, "0_regular", "regular", 0, 0.5, overrides=("trainer.lr=0.001",))
    write_run(tmp_path, "1_deformable", "deformable", 0, 0.6, overrides=("trainer.lr=0.01",))
    runs = collect_runs(tmp_path)
    assert pair_ratios(runs) == []
    text = render_markdown(runs, [])
    assert "No regular/deformable pair" in text
    assert "no completed deformable run: no verdict" in text and "no completed regular run: no verdict" in text


def test_grouping_ignores_seed_and_conv_and_keeps_deformable_only_keys_off_the_regular_arm(tmp_path: Path) -> None:
    # `-m seed=0,1 conv.placement=stages,all conv=regular,deformable trainer.lr=0.01`: the regular
    # arm reads no conv.* key, so both deformable placements are compared with the same regular runs.
    num = 0
    for seed in (0, 1):
        for placement in ("stages", "all"):
            for conv, value in (("regular", 0.5 + seed / 100), ("deformable", 0.6)):
                over = ("trainer.lr=0.01", f"conv.placement={placement}")
                write_run(tmp_path, f"{num}_{conv}", conv, seed, value, overrides=over, placement=placement)
                num += 1
    write_run(tmp_path, "90_other_lr", "regular", 0, 0.1, overrides=("trainer.lr=0.1",))
    groups = group_runs(collect_runs(tmp_path))
    lr = ("trainer.lr=0.01",)
    summary = {(tuple(g.setting["overrides"]), (g.setting["deformable"] or {}).get("placement")): g for g in groups}
    assert set(summary) == {(lr, "all"), (lr, "stages"), (("trainer.lr=0.1",), None)}
    for placement in ("all", "stages"):
        group = summary[(lr, placement)].summary
        assert group["arms"]["regular"]["runs"] == ["0_regular", "4_regular"]  # the first run of each seed
        assert group["arms"]["deformable"]["seeds"] == [0, 1]
        assert group["setting"]["deformable"]["overrides"] == [f"conv.placement={placement}"]
        assert group["difference"]["values"] == pytest.approx([0.1, 0.09])
        assert group["excluded"]["duplicate_seeds"] == [
            "2_regular repeats seed 0 of the regular arm (0_regular): not counted",
            "6_regular repeats seed 1 of the regular arm (4_regular): not counted",
        ]
    assert summary[(("trainer.lr=0.1",), None)].summary["arms"]["regular"]["n"] == 1


def test_mean_std_and_ci_of_the_paired_differences(tmp_path: Path) -> None:
    regular, deformable = [0.50, 0.52, 0.55], [0.56, 0.59, 0.60]
    write_pairs(tmp_path, regular, deformable)
    (group,) = group_runs(collect_runs(tmp_path))
    arms, diff = group.summary["arms"], group.summary["difference"]
    assert arms["regular"]["n"] == 3 and arms["regular"]["mean"] == pytest.approx(statistics.mean(regular))
    assert arms["regular"]["std"] == pytest.approx(statistics.stdev(regular))
    assert (arms["deformable"]["min"], arms["deformable"]["max"]) == (0.56, 0.60)
    assert arms["deformable"]["params"]["mean"] == 120 and arms["deformable"]["flops_per_image"]["mean"] == 1500
    diffs = [d - r for r, d in zip(regular, deformable, strict=True)]  # 0.06, 0.07, 0.05
    low, high = ci95(diffs)
    assert diff["n"] == 3 and diff["seeds"] == [0, 1, 2]
    assert diff["mean"] == pytest.approx(statistics.mean(diffs))
    assert diff["ci95"] == pytest.approx([low, high], abs=1e-4)
    verdict = group.summary["verdict"]
    assert verdict.startswith("deformable better by 0.0600 (95% CI ")
    assert numbers(verdict) == pytest.approx([0.06, 95, low, high, 3], abs=1e-4)


def test_a_ci_below_zero_is_worse_and_one_across_zero_is_no_difference(tmp_path: Path) -> None:
    write_pairs(tmp_path / "worse", [0.60, 0.62, 0.61], [0.50, 0.53, 0.50])
    (worse,) = group_runs(collect_runs(tmp_path / "worse"))
    low, high = ci95([-0.10, -0.09, -0.11])
    assert worse.summary["verdict"].startswith("deformable worse by 0.1000 (95% CI -0.")
    assert numbers(worse.summary["verdict"]) == pytest.approx([0.1, 95, low, high, 3], abs=1e-4)

    write_pairs(tmp_path / "same", [0.50, 0.60, 0.55], [0.56, 0.55, 0.56])
    (same,) = group_runs(collect_runs(tmp_path / "same"))
    low, high = ci95([0.06, -0.05, 0.01])
    assert same.summary["verdict"].startswith("no difference detectable at 3 seeds (95% CI ")
    assert numbers(same.summary["verdict"]) == pytest.approx([3, 95, low, high, high - low], abs=1e-4)


def test_time_ratio_is_a_geometric_mean_with_a_ci_on_log_ratios(tmp_path: Path) -> None:
    for seed, (t_reg, t_def) in enumerate([(1.0, 2.0), (1.1, 2.1), (0.9, 1.9)]):
        write_run(tmp_path, f"{2 * seed}_r", "regular", seed, 0.5, epoch_time=t_reg)
        write_run(tmp_path, f"{2 * seed + 1}_d", "deformable", seed, 0.5, epoch_time=t_def)
    (group,) = group_runs(collect_runs(tmp_path))
    logs = [math.log(2.0 / 1.0), math.log(2.1 / 1.1), math.log(1.9 / 0.9)]
    low, high = ci95(logs)
    ratio = group.summary["cost"]["epoch_time_ratio"]
    assert ratio["mean"] == pytest.approx(math.exp(statistics.mean(logs)))
    assert ratio["ci95"] == pytest.approx([math.exp(low), math.exp(high)], rel=1e-3)
    expected = f"deformable costs {math.exp(statistics.mean(logs)):.2f}x the epoch time (95% CI "
    assert group.summary["cost"]["verdict"].startswith(expected)
    assert group.summary["cost"]["params_ratio"] == pytest.approx(1.2)


def test_one_seed_gives_no_verdict(tmp_path: Path) -> None:
    write_pairs(tmp_path, [0.5], [0.7])
    (group,) = group_runs(collect_runs(tmp_path))
    assert group.summary["verdict"] == "one seed: no verdict, sweep seed=0,1,2"
    assert group.summary["difference"]["n"] == 1 and group.summary["difference"]["ci95"] is None
    assert group.summary["arms"]["regular"]["std"] is None
    assert "one seed: no CI" in group.summary["cost"]["verdict"]


def test_a_seed_missing_in_one_arm_and_a_diverged_run_are_left_out_of_the_pairs(tmp_path: Path) -> None:
    write_pairs(tmp_path, [0.5, 0.6], [0.55, 0.66])
    write_run(tmp_path, "4_resnet34_regular", "regular", 2, 0.7)  # its deformable partner never ran
    write_run(tmp_path, "5_resnet34_regular", "regular", 3, 0.7)
    write_run(tmp_path, "6_resnet34_deformable", "deformable", 3, math.nan, status="diverged")
    runs = collect_runs(tmp_path)
    (group,) = group_runs(runs)
    assert group.summary["arms"]["regular"]["seeds"] == [0, 1, 2, 3]
    assert group.summary["arms"]["deformable"]["seeds"] == [0, 1]
    assert group.summary["difference"]["seeds"] == [0, 1]
    assert group.summary["difference"]["values"] == pytest.approx([0.05, 0.06])
    assert group.summary["excluded"]["diverged"] == ["6_resnet34_deformable"]
    text = render_markdown(runs, [])
    assert "## Diverged runs (1; excluded from statistics)" in text and "| 6_resnet34_deformable |" in text


def test_report_json_lists_failed_and_corrupt_runs_and_leads_the_markdown_with_verdicts(tmp_path: Path) -> None:
    write_pairs(tmp_path, [0.5, 0.6], [0.55, 0.66])
    failed = write_run(tmp_path, "4_resnet34_regular", "regular", 2, 0.0)
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "reason": "boom", "conv": "regular"}))
    (tmp_path / "5_corrupt" / ".hydra").mkdir(parents=True)
    (tmp_path / "5_corrupt" / ".hydra" / "overrides.yaml").write_text("- conv=deformable\n")
    (tmp_path / "5_corrupt" / "metrics.json").write_text('{"val_acc": 0.')
    report = write_report(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert [(f["run_dir"], f["status"]) for f in data["failed"]] == [
        ("4_resnet34_regular", "failed"),
        ("5_corrupt", "unreadable"),
    ]
    assert data["failed"][0]["reason"] == "boom" and "unreadable run record" in data["failed"][1]["reason"]
    (group,) = data["groups"]
    assert group["arms"]["regular"]["n"] == 2 and group["difference"]["n"] == 2
    assert group["verdict"] == report.data["groups"][0]["verdict"]
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Verdicts") < text.index("## Runs") < text.index("## Failed runs (2 of 6)")


def test_merging_two_sweeps_pools_their_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, out = tmp_path / "sweep_a", tmp_path / "sweep_b", tmp_path / "out"
    write_pairs(a, [0.50, 0.52], [0.56, 0.59])
    write_run(b, "0_resnet34_regular", "regular", 2, 0.55)
    write_run(b, "1_resnet34_deformable", "deformable", 2, 0.60)
    assert cli.main([str(a), str(b), "--output", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["sweeps"] == ["sweep_a", "sweep_b"]
    (group,) = data["groups"]
    assert group["difference"]["seeds"] == [0, 1, 2]
    assert group["difference"]["mean"] == pytest.approx(statistics.mean([0.06, 0.07, 0.05]))
    assert group["arms"]["deformable"]["runs"] == [
        "sweep_a/1_resnet34_deformable",
        "sweep_a/3_resnet34_deformable",
        "sweep_b/1_resnet34_deformable",
    ]
    assert "| sweep_b/0_resnet34_regular | resnet34 | regular |" in (out / "report.md").read_text()
    assert not (a / "report.md").exists()
    assert "report.md" in capsys.readouterr().err


def test_runs_on_different_hardware_or_a_shared_machine_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"cpu": "Xeon", "gpu": None, "torch_threads": 2, "concurrent_jobs": 1}
    write_run(tmp_path, "0_r", "regular", 0, 0.5, environment=env, backend="none")
    write_run(tmp_path, "1_d", "deformable", 0, 0.6, environment=env, backend="cpp-cpu")
    write_run(tmp_path, "2_r", "regular", 1, 0.5, environment={**env, "cpu": "EPYC", "concurrent_jobs": 2})
    write_run(tmp_path, "3_d", "deformable", 1, 0.6, environment=env, backend="pytorch-fallback")
    write_run(tmp_path, "4_r", "regular", 2, 0.5)  # an old record: no environment at all
    write_run(tmp_path, "5_d", "deformable", 2, 0.6, environment=env, backend="cpp-cpu")
    assert cli.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    (group,) = json.loads((tmp_path / "report.json").read_text())["groups"]
    assert group["environment"]["cpu"] == ["EPYC", "Xeon", "unknown"]
    assert group["environment"]["deformable_backend"] == {
        "regular": ["none", "unknown"],
        "deformable": ["cpp-cpu", "pytorch-fallback"],
    }
    expected = [
        "G1: runs differ in cpu: EPYC (2_r); Xeon (0_r, 1_d, 3_d, 5_d); unknown (4_r)",
        "G1: deformable runs differ in deformable_backend: cpp-cpu (1_d, 5_d); pytorch-fallback (3_d)",
    ]
    text = (tmp_path / "report.md").read_text()
    for warning in expected:
        assert warning in group["warnings"] and warning in text and f"warning: {warning}" in err
    assert any("shared the machine" in w and "2_r" in w for w in group["warnings"])
    assert group["cost"]["shared_machine"] and "concurrent_jobs > 1" in group["cost"]["verdict"]


def test_robustness_auc_is_paired_over_seeds(tmp_path: Path) -> None:
    rotation = {"regular": [0.40, 0.42, 0.41], "deformable": [0.50, 0.51, 0.52]}
    scale = {"regular": [0.40, 0.45, 0.42], "deformable": [0.44, 0.40, 0.43]}
    for seed in range(3):
        for num, conv in enumerate(("regular", "deformable")):
            auc = {"rotation": rotation[conv][seed], "scale": scale[conv][seed]}
            write_run(tmp_path, f"{2 * seed + num}_{conv}", conv, seed, 0.5, robustness=auc)
    report = write_report(tmp_path)
    robustness = json.loads((tmp_path / "report.json").read_text())["groups"][0]["robustness"]
    rot = [d - r for r, d in zip(rotation["regular"], rotation["deformable"], strict=True)]
    assert robustness["rotation"]["difference"]["mean"] == pytest.approx(statistics.mean(rot))
    assert robustness["rotation"]["difference"]["ci95"] == pytest.approx(list(ci95(rot)), abs=1e-4)
    assert robustness["rotation"]["verdict"].startswith("deformable better by 0.1000 (95% CI ")
    assert robustness["scale"]["verdict"].startswith("no difference detectable at 3 seeds")
    assert robustness["rotation"]["arms"]["regular"]["mean"] == pytest.approx(statistics.mean(rotation["regular"]))
    assert f"| rotation | 0.4100 ± 0.0100 | 0.5100 ± 0.0100 | 0.1000 | {robustness['rotation']['verdict']} |" in (
        report.markdown
    )
    assert "robustness_by_arm.png" in report.data["plots"]


def test_the_plots_are_written_and_linked(tmp_path: Path) -> None:
    write_pairs(tmp_path, [0.50, 0.52], [0.56, 0.59], robustness={"rotation": 0.4, "scale": 0.3})
    report = write_report(tmp_path)
    assert report.data["plots"] == ["curves.png", "cost.png", "differences.png", "robustness_by_arm.png"]
    for name in report.data["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name})" in report.markdown


def test_the_same_setting_spelled_differently_is_one_group(tmp_path: Path) -> None:
    from dcn_experiments.report.runs import shared_overrides

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("- conv=regular\n- trainer.lr=1e-3\n- report.robustness=True\n- seed=0\n")
    b.write_text(
        "- conv=deformable\n- trainer.lr=0.001\n- report.robustness=false\n- seed=1\n- trainer.progress=false\n"
    )
    assert shared_overrides(a) == shared_overrides(b) == ["trainer.lr=0.001"]
