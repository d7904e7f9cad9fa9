"""Group the runs of a sweep by setting, pair the arms by seed, and summarise each group.

A *setting* is everything but the seed and the conv choice: task, model, dataset and the job's
command-line overrides (minus ``conv=``, ``seed=``, ``hydra.*``). Keys that only the deformable arm
reads (``conv.*`` overrides, and the record's ``placement``, ``conv_version``, ``offset_lr_mult``)
define the deformable *variant*: each variant is a group of its own, and the regular runs of the
setting are the baseline of every variant. Only completed runs enter the statistics; diverged runs
are listed per group and excluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dcn_experiments.engine.results import DIVERGED, headline_metric, headline_value
from dcn_experiments.report.runs import override_key, trained
from dcn_experiments.report.stats import (
    cost_verdict,
    difference_verdict,
    paired_difference,
    paired_ratio,
    summarize,
)

REGULAR, DEFORMABLE = "regular", "deformable"
DEFORMABLE_ONLY_FIELDS = ("placement", "conv_version", "offset_lr_mult")
COST_FIELDS = ("epoch_time_s", "train_throughput_img_s", "params", "flops_per_image")
ENVIRONMENT_FIELDS = ("device", "cpu", "gpu", "torch_threads", "world_size")
UNKNOWN = "unknown"
SHARED_MACHINE_FLAG = "flagged: measured while jobs shared the machine (concurrent_jobs > 1)"
MIXED_PRECISION_FLAG = "flagged: the deformable layers computed in another dtype than the run's precision"


@dataclass
class Group:
    """One setting and deformable variant: the runs counted per arm, the diverged ones, the summary."""

    id: str
    setting: dict[str, Any]
    arms: dict[str, dict[Any, dict[str, Any]]] = field(default_factory=dict)  # conv -> seed -> run
    diverged: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def treatment(self) -> str:
        """The conv name compared against ``regular`` (``deformable``)."""
        variant = self.setting.get("deformable")
        return variant["conv"] if variant else DEFORMABLE

    @property
    def label(self) -> str:
        """A short human name: model, dataset, overrides and the deformable variant."""
        s = self.setting
        parts = [str(s["model"]), str(s["dataset"]), *s["overrides"]]
        variant = s.get("deformable")
        if variant:
            parts.append(
                f"{variant['conv']} v{variant['conv_version']} {variant['placement']}, "
                f"offset lr x{variant['offset_lr_mult']}"
            )
            parts += variant["overrides"]
        return " · ".join(parts)


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool):
        return (1, str(value))
    return (0, value, "") if isinstance(value, int | float) else (1, str(value))


def setting_of(run: dict[str, Any]) -> dict[str, Any]:
    """What both arms share: task, model, dataset, metric and the overrides that are not ``conv.*``."""
    return {
        "task": run.get("task"),
        "model": run.get("model"),
        "dataset": run.get("dataset"),
        "metric": headline_metric(run),
        "overrides": [o for o in run.get("overrides", ()) if not override_key(o).startswith("conv.")],
    }


def variant_of(run: dict[str, Any]) -> dict[str, Any] | None:
    """The deformable-only settings of a non-regular run (None for a regular run)."""
    if run.get("conv") == REGULAR:
        return None
    return {
        "conv": run.get("conv"),
        **{key: run.get(key) for key in DEFORMABLE_ONLY_FIELDS},
        "overrides": [o for o in run.get("overrides", ()) if override_key(o).startswith("conv.")],
    }


def _key(value: dict[str, Any] | None) -> str:
    return repr(sorted(value.items())) if value else ""


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """The groups of the trained runs (see the module docstring), summarised, with ids ``G1, G2, ...``."""
    settings: dict[str, dict[str, Any]] = {}
    members: dict[str, list[dict[str, Any]]] = {}
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for run in trained(runs):
        setting = setting_of(run)
        key = _key(setting)
        settings.setdefault(key, setting)
        members.setdefault(key, []).append(run)
        variant = variant_of(run)
        if variant is not None:
            variants.setdefault(key, {})[_key(variant)] = variant
    groups = []
    for key in sorted(settings):
        for variant_key in sorted(variants.get(key, {"": None})):
            variant = variants.get(key, {}).get(variant_key)
            group = Group(id="", setting={**settings[key], "deformable": variant})
            for run in members[key]:  # in collect order: the first of duplicate seeds is counted
                if run.get("conv") == REGULAR or _key(variant_of(run)) == variant_key:
                    _add(group, run)
            groups.append(group)
    for number, group in enumerate(groups, start=1):
        group.id = f"G{number}"
        group.summary = summarize_group(group)
    return groups


def _add(group: Group, run: dict[str, Any]) -> None:
    if run.get("status") == DIVERGED:
        group.diverged.append(run)
        return
    arm = group.arms.setdefault(str(run.get("conv")), {})
    seed = run.get("seed")
    if seed in arm:
        group.duplicates.append(
            f"{run['run_dir']} repeats seed {seed} of the {run.get('conv')} arm ({arm[seed]['run_dir']}): not counted"
        )
        return
    arm[seed] = run


def arm_order(group: Group) -> list[str]:
    """The group's arms, ``regular`` first."""
    return sorted(group.arms, key=lambda conv: (conv != REGULAR, conv))


def arm_runs(group: Group, conv: str) -> list[dict[str, Any]]:
    """The counted runs of one arm, in seed order."""
    by_seed = group.arms.get(conv, {})
    return [by_seed[seed] for seed in sorted(by_seed, key=_sort_key)]


def _pairs(group: Group, value_of: Any) -> list[tuple[Any, float, float]]:
    base, treated = group.arms.get(REGULAR, {}), group.arms.get(group.treatment, {})
    pairs = []
    for seed in sorted(set(base) & set(treated), key=_sort_key):
        b, t = value_of(base[seed]), value_of(treated[seed])
        if _is_number(b) and _is_number(t):
            pairs.append((seed, float(b), float(t)))
    return pairs


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summarize_arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline metric ``n, mean, std, min, max`` over the arm's seeds, plus the same for each cost field."""
    return {
        **summarize([headline_value(r) for r in runs]),
        "seeds": [r.get("seed") for r in runs],
        "runs": [r["run_dir"] for r in runs],
        **{name: summarize([r.get(name) for r in runs]) for name in COST_FIELDS},
    }


def summarize_group(group: Group) -> dict[str, Any]:
    """The ``report.json`` entry of a group: setting, arms, paired difference, verdict, cost, robustness."""
    treatment = group.treatment
    arms = {conv: summarize_arm(arm_runs(group, conv)) for conv in arm_order(group)}
    difference = {"metric": group.setting["metric"], **paired_difference(_pairs(group, headline_value))}
    missing = [conv for conv in (REGULAR, treatment) if conv not in group.arms]
    verdict = f"no completed {missing[0]} run: no verdict" if missing else difference_verdict(difference, treatment)
    environment, warnings = _environment(group)
    return {
        "id": group.id,
        "label": group.label,
        "setting": group.setting,
        "arms": arms,
        "difference": difference,
        "verdict": verdict,
        "cost": _cost(group, arms, missing),
        "robustness": _robustness(group),
        "excluded": {
            "diverged": [r["run_dir"] for r in group.diverged],
            "duplicate_seeds": group.duplicates,
        },
        "environment": environment,
        "warnings": warnings,
    }


def _cost(group: Group, arms: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    time_ratio = paired_ratio(_pairs(group, lambda r: r.get("epoch_time_s")))
    shared = any(_concurrent(r) > 1 for r in counted_runs(group))
    mixed = any(r.get("deformable_precision_note") for r in counted_runs(group))
    if missing:
        verdict = f"no completed {missing[0]} run: no cost verdict"
    else:
        verdict = cost_verdict(time_ratio, group.treatment)
        if shared and time_ratio["n"]:
            verdict += f"; {SHARED_MACHINE_FLAG}"
        if mixed and time_ratio["n"]:
            verdict += f"; {MIXED_PRECISION_FLAG}"

    def mean_ratio(name: str) -> float | None:
        base = arms.get(REGULAR, {}).get(name, {}).get("mean")
        treated = arms.get(group.treatment, {}).get(name, {}).get("mean")
        return treated / base if base and treated is not None else None

    return {
        "epoch_time_ratio": time_ratio,
        "throughput_ratio": paired_ratio(_pairs(group, lambda r: r.get("train_throughput_img_s"))),
        "params_ratio": mean_ratio("params"),
        "flops_ratio": mean_ratio("flops_per_image"),
        "shared_machine": shared,
        "deformable_precision_differs": mixed,
        "verdict": verdict,
    }


def _robustness(group: Group) -> dict[str, Any]:
    runs = counted_runs(group)
    axes = sorted({axis for r in runs for axis in ((r.get("robustness") or {}).get("auc") or {})})
    result = {}
    for axis in axes:

        def auc(run: dict[str, Any], axis: str = axis) -> Any:
            return ((run.get("robustness") or {}).get("auc") or {}).get(axis)

        difference = {"metric": f"AUC ({axis})", **paired_difference(_pairs(group, auc))}
        has_both = REGULAR in group.arms and group.treatment in group.arms
        arms = {conv: summarize([auc(r) for r in arm_runs(group, conv)]) for conv in arm_order(group)}
        result[axis] = {
            "arms": arms,
            "difference": difference,
            "verdict": difference_verdict(difference, group.treatment) if has_both else "one arm only: no verdict",
        }
    return result


def _concurrent(run: dict[str, Any]) -> int:
    env = run.get("environment")
    value = env.get("concurrent_jobs") if isinstance(env, dict) else None
    return value if isinstance(value, int) else 1


def environment_value(run: dict[str, Any], name: str) -> str:
    """A run's ``device``/``deformable_backend`` or ``environment.<name>`` as text; ``unknown`` when absent."""
    if name in ("device", "deformable_backend", "precision"):
        value = run.get(name, UNKNOWN)
    else:
        env = run.get("environment")
        value = env.get(name, UNKNOWN) if isinstance(env, dict) else UNKNOWN
    return "none" if value is None else str(value)


def _distinct(runs: list[dict[str, Any]], name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for run in runs:
        values.setdefault(environment_value(run, name), []).append(run["run_dir"])
    return values


def _environment(group: Group) -> tuple[dict[str, Any], list[str]]:
    """What the counted runs ran on, and a warning for every field in which they differ."""
    runs = counted_runs(group)
    environment: dict[str, Any] = {}
    warnings = []

    def check(name: str, subset: list[dict[str, Any]], what: str) -> list[str]:
        values = _distinct(subset, name)
        if len(values) > 1:
            listed = "; ".join(f"{value} ({', '.join(dirs)})" for value, dirs in sorted(values.items()))
            warnings.append(f"{group.id}: {what} differ in {name}: {listed}")
        return sorted(values)

    for name in ENVIRONMENT_FIELDS:
        environment[name] = check(name, runs, "runs")
    environment["deformable_backend"] = {
        conv: check("deformable_backend", arm_runs(group, conv), f"{conv} runs") for conv in arm_order(group)
    }
    environment["precision"] = check("precision", runs, "runs")
    mixed = [r["run_dir"] for r in runs if r.get("deformable_precision_note")]
    if mixed:
        warnings.append(
            f"{group.id}: in {len(mixed)} run(s) the deformable layers computed in another dtype than the run's "
            f"precision (on CPU the op computes bf16 in float32: {', '.join(mixed)}); the time ratio favours regular"
        )
    shared = [r["run_dir"] for r in runs if _concurrent(r) > 1]
    environment["concurrent_jobs"] = sorted(_distinct(runs, "concurrent_jobs"))
    if shared:
        warnings.append(
            f"{group.id}: {len(shared)} run(s) shared the machine with other jobs (concurrent_jobs > 1: "
            f"{', '.join(shared)}); their epoch times and the time ratio are not reliable"
        )
    return environment, warnings


def pair_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """One row per group and seed where both arms completed: values and deformable/regular ratios."""
    rows = []
    for group in groups:
        base, treated = group.arms.get(REGULAR, {}), group.arms.get(group.treatment, {})
        variant = group.setting.get("deformable") or {}
        overrides = [*group.setting["overrides"], *variant.get("overrides", [])]
        for seed in sorted(set(base) & set(treated), key=_sort_key):
            b, t = base[seed], treated[seed]
            rows.append(
                {
                    "group": group.id,
                    "model": group.setting["model"],
                    "dataset": group.setting["dataset"],
                    "seed": seed,
                    "placement": variant.get("placement"),
                    "overrides": " ".join(overrides) or "-",
                    "metric": group.setting["metric"],
                    "regular": headline_value(b),
                    "deformable": headline_value(t),
                    "delta": headline_value(t) - headline_value(b),
                    "time_ratio": _ratio(t.get("epoch_time_s"), b.get("epoch_time_s")),
                    "throughput_ratio": _ratio(t.get("train_throughput_img_s"), b.get("train_throughput_img_s")),
                    "params_ratio": _ratio(t.get("params"), b.get("params")),
                }
            )
    return rows


def _ratio(a: Any, b: Any) -> float:
    return a / b if _is_number(a) and _is_number(b) and b else math.nan


def counted_runs(group: Group) -> list[dict[str, Any]]:
    """The runs of a group that enter its statistics (completed, one per arm and seed), regular first."""
    return [r for conv in arm_order(group) for r in arm_runs(group, conv)]
