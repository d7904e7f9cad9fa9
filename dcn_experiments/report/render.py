"""Render the sweep report: the ``report.json`` payload and ``report.md`` (verdicts first)."""

from __future__ import annotations

import math
from typing import Any

from dcn_experiments.engine.results import headline_metric, headline_value
from dcn_experiments.report.runs import diverged_runs, failed_runs, trained
from dcn_experiments.report.summary import Group, counted_runs, environment_value, pair_rows

REPORT_SCHEMA_VERSION = 1
NO_PAIR_TEXT = (
    "No regular/deformable pair with the same model, dataset, seed and other overrides where both arms completed."
)
METHOD = {
    "pairing": "runs of one group that share a seed; only completed runs (diverged runs are excluded)",
    "difference": "deformable - regular of the headline metric, per seed",
    "ci95": "Student t interval on the paired differences, df = n - 1",
    "time_ratio": "deformable / regular epoch_time_s per seed; geometric mean, t interval on the log ratios",
    "robustness": "AUC per axis from robustness.json, paired over seeds like the headline metric",
}
METHOD_TEXT = (
    "Groups share every setting but the seed and the conv choice; deformable-only keys (placement, version, "
    "offset lr) make a deformable variant compared with the same regular runs. Arms are paired by seed over "
    "the seeds where both completed: the difference is deformable − regular, its 95% CI a Student t interval "
    "on the paired differences (df = n − 1). The epoch-time ratio is the geometric mean of deformable / "
    "regular with a t interval on the log ratios. Diverged runs are listed but excluded from the statistics."
)


def report_data(
    all_runs: list[dict[str, Any]], groups: list[Group], sweeps: list[str], plots: list[str]
) -> dict[str, Any]:
    """The ``report.json`` payload: method, groups, per-run rows, failed and diverged runs, warnings, plots."""
    membership = _membership(groups)
    warnings = [w for g in groups for w in g.summary["warnings"]]
    warnings += [r["robustness_error"] for r in all_runs if r.get("robustness_error")]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "sweeps": sweeps,
        "method": METHOD,
        "groups": [g.summary for g in groups],
        "pairs": pair_rows(groups),
        "runs": [_run_row(r, membership.get(r["run_dir"], [])) for r in trained(all_runs)],
        "diverged": [{"run_dir": r["run_dir"], "reason": r.get("reason")} for r in diverged_runs(all_runs)],
        "failed": [
            {"run_dir": r["run_dir"], "status": r["status"], "reason": r.get("reason")} for r in failed_runs(all_runs)
        ],
        "total_runs": len(all_runs),
        "warnings": warnings,
        "plots": plots,
    }


def _membership(groups: list[Group]) -> dict[str, list[str]]:
    member: dict[str, list[str]] = {}
    for group in groups:
        runs = counted_runs(group) + group.diverged
        for run in runs:
            member.setdefault(run["run_dir"], []).append(group.id)
    return member


def _run_row(run: dict[str, Any], group_ids: list[str]) -> dict[str, Any]:
    return {
        "run_dir": run["run_dir"],
        "status": run.get("status"),
        "groups": group_ids,
        **{k: run.get(k) for k in ("model", "conv", "dataset", "seed")},
        "placement": run.get("placement") if run.get("conv") != "regular" else None,
        "metric": headline_metric(run),
        "value": headline_value(run),
        **{k: run.get(k) for k in ("val_loss", "epoch_time_s", "train_throughput_img_s", "params", "flops_per_image")},
        "deformable_backend": environment_value(run, "deformable_backend"),
        "torch_threads": environment_value(run, "torch_threads"),
        "robustness": run.get("robustness") is not None,
    }


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: ``n/a`` for None/NaN, floats to ``digits`` places, ints with separators."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _spread(summary: dict[str, Any], digits: int) -> str:
    if not summary or summary["n"] == 0:
        return "n/a"
    text = fmt(summary["mean"], digits)
    return text if summary["std"] is None else f"{text} ± {fmt(summary['std'], digits)}"


def render_report(data: dict[str, Any]) -> str:
    """``report.md``: verdicts and warnings first, then each group, per-seed pairs, all runs, failures, plots."""
    lines = ["# Regular vs deformable convolutions", ""]
    if len(data["sweeps"]) > 1:
        lines += [f"Sweeps merged: {', '.join(data['sweeps'])}", ""]
    lines += _verdicts(data)
    for group in data["groups"]:
        lines += _group_section(group)
    lines += _pairs_section(data)
    lines += _runs_section(data)
    if data["diverged"]:
        lines += ["", f"## Diverged runs ({len(data['diverged'])}; excluded from statistics)", ""]
        lines += ["| run | reason |", "|---|---|"]
        lines += [f"| {r['run_dir']} | {_cell(r['reason'] or 'non-finite loss')} |" for r in data["diverged"]]
    if data["failed"]:
        lines += ["", f"## Failed runs ({len(data['failed'])} of {data['total_runs']})", ""]
        lines += ["| run | status | reason |", "|---|---|---|"]
        lines += [f"| {r['run_dir']} | {r['status']} | {_cell(r.get('reason') or '')} |" for r in data["failed"]]
    if data["plots"]:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in data["plots"]]
    return "\n".join(lines) + "\n"


def _verdicts(data: dict[str, Any]) -> list[str]:
    lines = ["## Verdicts", "", METHOD_TEXT, ""]
    if not data["groups"]:
        return [*lines, "No run trained: nothing to compare.", ""]
    lines += ["| group | setting | metric | seeds paired | verdict | cost |", "|---|---|---|---:|---|---|"]
    for g in data["groups"]:
        lines.append(
            f"| {g['id']} | {_cell(g['label'])} | {g['setting']['metric']} | {g['difference']['n']} | "
            f"{_cell(g['verdict'])} | {_cell(g['cost']['verdict'])} |"
        )
    if data["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in data["warnings"]]
    return [*lines, ""]


def _group_section(g: dict[str, Any]) -> list[str]:
    s = g["setting"]
    variant = s.get("deformable")
    setting = f"task {s['task']}, model {s['model']}, dataset {s['dataset']}"
    setting += f", overrides: {' '.join(s['overrides']) or '-'}"
    if variant:
        setting += (
            f"; {variant['conv']} arm: version {variant['conv_version']}, placement {variant['placement']}, "
            f"offset lr x{variant['offset_lr_mult']}"
        )
        setting += "".join(f", {o}" for o in variant["overrides"])
    env = g["environment"]
    backends = ", ".join(f"{conv}: {' / '.join(v)}" for conv, v in env["deformable_backend"].items())
    lines = [
        f"### {g['id']}: {g['label']}",
        "",
        f"- setting: {setting}",
        f"- {s['metric']}: **{g['verdict']}**",
        f"- cost: **{g['cost']['verdict']}**",
        f"- environment: device {' / '.join(env['device'])} · cpu {' / '.join(env['cpu'])} · "
        f"gpu {' / '.join(env['gpu'])} · threads {' / '.join(env['torch_threads'])} · backend {backends} · "
        f"concurrent jobs {' / '.join(env['concurrent_jobs'])} · processes {' / '.join(env['world_size'])} · "
        f"precision {' / '.join(env['precision'])}",
    ]
    lines += [f"- ⚠ {w}" for w in g["warnings"]]
    excluded = g["excluded"]
    if excluded["diverged"]:
        lines.append(f"- excluded from statistics (diverged): {', '.join(excluded['diverged'])}")
    lines += [f"- excluded from statistics: {d}" for d in excluded["duplicate_seeds"]]
    lines += [
        "",
        f"| arm | n | seeds | {s['metric']} mean | std | min | max | epoch time (s) | throughput (img/s) | params | "
        "FLOPs/img |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conv, arm in g["arms"].items():
        lines.append(
            f"| {conv} | {arm['n']} | {', '.join(map(str, arm['seeds']))} | {fmt(arm['mean'])} | {fmt(arm['std'])} | "
            f"{fmt(arm['min'])} | {fmt(arm['max'])} | {_spread(arm['epoch_time_s'], 2)} | "
            f"{_spread(arm['train_throughput_img_s'], 1)} | {fmt(_int(arm['params']['mean']))} | "
            f"{fmt(_int(arm['flops_per_image']['mean']))} |"
        )
    d, ratio = g["difference"], g["cost"]["epoch_time_ratio"]
    if d["n"]:
        per_seed = ", ".join(f"seed {seed}: {v:+.4f}" for seed, v in zip(d["seeds"], d["values"], strict=True))
        ci = f", 95% CI {d['ci95'][0]:+.4f}..{d['ci95'][1]:+.4f}" if d["ci95"] else ""
        lines += ["", f"Paired differences ({g['setting']['metric']}, deformable − regular): {per_seed}; "]
        lines[-1] += f"mean {d['mean']:+.4f}{ci}."
    if ratio["n"]:
        per_seed = ", ".join(f"seed {seed}: {v:.2f}x" for seed, v in zip(ratio["seeds"], ratio["values"], strict=True))
        lines += ["", f"Epoch time ratio (deformable / regular): {per_seed}; geometric mean {ratio['mean']:.2f}x."]
    if g["robustness"]:
        lines += _robustness_table(g)
    return [*lines, ""]


def _int(value: float | None) -> int | None:
    return round(value) if value is not None else None


def _robustness_table(g: dict[str, Any]) -> list[str]:
    arms = list(g["arms"])
    lines = [
        "",
        "Robustness (AUC = mean metric over the strengths of an axis, from robustness.json; paired over seeds):",
        "",
        f"| axis | {' | '.join(f'{conv} AUC' for conv in arms)} | difference | verdict |",
        "|---|" + "---:|" * len(arms) + "---:|---|",
    ]
    for axis, r in g["robustness"].items():
        cells = " | ".join(_spread(r["arms"].get(conv, {}), 4) for conv in arms)
        lines.append(f"| {axis} | {cells} | {fmt(r['difference']['mean'])} | {_cell(r['verdict'])} |")
    return lines


def _pairs_section(data: dict[str, Any]) -> list[str]:
    lines = ["", "## Deformable / regular", ""]
    rows = data["pairs"]
    if not rows:
        return [*lines, NO_PAIR_TEXT]
    lines += [
        "| group | model | dataset | seed | placement | overrides | metric | regular | deformable | delta | "
        "epoch time x | throughput x | params x |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in rows:
        lines.append(
            f"| {p['group']} | {p['model']} | {p['dataset']} | {p['seed']} | {p['placement']} | {p['overrides']} | "
            f"{p['metric']} | {fmt(p['regular'])} | {fmt(p['deformable'])} | {fmt(p['delta'])} | "
            f"{fmt(p['time_ratio'], 2)} | {fmt(p['throughput_ratio'], 2)} | {fmt(p['params_ratio'], 3)} |"
        )
    return lines


def _runs_section(data: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Runs",
        "",
        "| run | model | conv | placement | dataset | seed | group | status | params | FLOPs/img | metric | value | "
        "val loss | epoch time (s) | throughput (img/s) | backend | threads |",
        "|---|---|---|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {r['run_dir']} | {r['model']} | {r['conv']} | {r['placement'] or '-'} | {r['dataset']} | {r['seed']} | "
            f"{', '.join(r['groups']) or '-'} | {r['status']} | {fmt(r['params'])} | {fmt(r['flops_per_image'])} | "
            f"{r['metric']} | {fmt(r['value'])} | {fmt(r['val_loss'])} | {fmt(r['epoch_time_s'], 2)} | "
            f"{fmt(r['train_throughput_img_s'], 1)} | {r['deformable_backend']} | {r['torch_threads']} |"
        )
    return lines
