"""PNG plots of a sweep report (matplotlib, Agg): curves, cost, paired differences, robustness.

Each plot has one panel (or one row of panels) per group, labelled with the group id of report.md.
Bands span min..max over the seeds of an arm; lines are the mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dcn_experiments.report.summary import REGULAR, Group, arm_order, arm_runs

CURVES, COST, DIFFERENCES, ROBUSTNESS = "curves.png", "cost.png", "differences.png", "robustness_by_arm.png"
COLORS = {REGULAR: "tab:blue", "deformable": "tab:orange"}
DPI = 100


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: the report CLI starts fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _color(conv: str) -> str:
    return COLORS.get(conv, "tab:green")


def _runs(group: Group, conv: str) -> list[dict[str, Any]]:
    return arm_runs(group, conv)


def _grid(plt: Any, count: int, ncols: int = 3, size: tuple[float, float] = (4.5, 3.4)) -> tuple[Any, list[Any]]:
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _band(ax: Any, xs: list[float], series: list[list[float]], conv: str) -> None:
    """Mean line and min..max band of ``series`` (one list per seed, aligned with ``xs``)."""
    columns = [[s[i] for s in series if i < len(s) and _finite(s[i])] for i in range(len(xs))]
    kept = [(x, c) for x, c in zip(xs, columns, strict=True) if c]
    if not kept:
        return
    x = [k for k, _ in kept]
    mean = [sum(c) / len(c) for _, c in kept]
    ax.plot(x, mean, marker="o", markersize=3, color=_color(conv), label=f"{conv} (n={len(series)})")
    ax.fill_between(x, [min(c) for _, c in kept], [max(c) for _, c in kept], color=_color(conv), alpha=0.2)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_curves(groups: list[Group], path: Path) -> None:
    """Validation metric per epoch: mean and min..max band over seeds per arm, one panel per group."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(groups))
    for ax, group in zip(axes, groups, strict=True):
        metric = group.setting["metric"]
        for conv in arm_order(group):
            runs = _runs(group, conv)
            epochs = sorted({e["epoch"] for r in runs for e in r.get("epochs") or [] if "epoch" in e})
            index = {epoch: i for i, epoch in enumerate(epochs)}
            series = []
            for run in runs:
                values = [math.nan] * len(epochs)
                for e in run.get("epochs") or []:
                    if "epoch" in e and _finite(e.get(metric)):
                        values[index[e["epoch"]]] = e[metric]
                series.append(values)
            _band(ax, epochs, series, conv)
        ax.set(title=f"{group.id}: {group.setting['model']} {group.setting['dataset']}", xlabel="epoch", ylabel=metric)
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_cost(groups: list[Group], path: Path) -> None:
    """Epoch time and throughput per group and arm: mean bar, min..max error bar, one dot per seed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(groups) + 4), 4), squeeze=False)
    convs = sorted({conv for g in groups for conv in g.arms}, key=lambda conv: (conv != REGULAR, conv))
    width = 0.8 / max(1, len(convs))
    panels = [("epoch_time_s", "epoch time (s)"), ("train_throughput_img_s", "train throughput (img/s)")]
    for ax, (name, label) in zip(axes[0], panels, strict=True):
        for j, conv in enumerate(convs):
            for i, group in enumerate(groups):
                values = [r.get(name) for r in _runs(group, conv) if _finite(r.get(name))]
                if not values:
                    continue
                x = i + (j - (len(convs) - 1) / 2) * width
                mean = sum(values) / len(values)
                ax.bar(x, mean, width * 0.9, color=_color(conv), alpha=0.6, label=conv if i == 0 else None)
                ax.errorbar(x, mean, yerr=[[mean - min(values)], [max(values) - mean]], color="black", capsize=3)
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(groups)), [g.id for g in groups])
        ax.set(ylabel=label, title=label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("bar: mean over seeds, whisker: min..max, dots: seeds", fontsize=9)
    _save(plt, fig, path)


def plot_differences(groups: list[Group], path: Path) -> None:
    """Paired differences (metric) and epoch-time ratios per group: one dot per seed, the mean and its 95% CI."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3.0, 0.6 * len(groups) + 1.5)), squeeze=False)
    left, right = axes[0]
    for y, group in enumerate(groups):
        for ax, stats in ((left, group.summary["difference"]), (right, group.summary["cost"]["epoch_time_ratio"])):
            if not stats["n"]:
                continue
            ax.scatter(stats["values"], [y] * stats["n"], color="tab:gray", s=14, zorder=3)
            if stats["ci95"]:
                low, high = stats["ci95"]
                ax.errorbar(
                    stats["mean"],
                    y,
                    xerr=[[stats["mean"] - low], [high - stats["mean"]]],
                    fmt="D",
                    color="black",
                    capsize=4,
                    zorder=4,
                )
            else:
                ax.scatter([stats["mean"]], [y], marker="D", color="black", zorder=4)
    metrics = " / ".join(sorted({g.setting["metric"] for g in groups}))
    left.axvline(0, color="tab:red", lw=1)
    left.set(xlabel=f"deformable − regular ({metrics})", title="Paired difference per seed, mean and 95% CI")
    right.axvline(1, color="tab:red", lw=1)
    right.set(xlabel="deformable / regular epoch time", title="Time ratio per seed, geometric mean and 95% CI")
    for ax in (left, right):
        ax.set_yticks(range(len(groups)), [g.id for g in groups])
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    _save(plt, fig, path)


def plot_robustness(groups: list[Group], path: Path) -> None:
    """Metric vs perturbation strength per axis (columns) and group (rows): mean and min..max band per arm."""
    plt = _pyplot()
    axes_names = sorted({axis for g in groups for axis in g.summary["robustness"]})
    fig, axes = plt.subplots(
        len(groups), len(axes_names), figsize=(4 * len(axes_names), 3.2 * len(groups)), squeeze=False
    )
    for row, group in zip(axes, groups, strict=True):
        for ax, axis in zip(row, axes_names, strict=True):
            unit = ""
            for conv in arm_order(group):
                curves = [
                    (r["robustness"].get("axes") or {}).get(axis) for r in _runs(group, conv) if r.get("robustness")
                ]
                curves = [c for c in curves if c and c.get("strengths")]
                if not curves:
                    continue
                strengths = curves[0]["strengths"]
                unit = curves[0].get("unit", "")
                same = [c["values"] for c in curves if c["strengths"] == strengths]
                _band(ax, strengths, same, conv)
            verdict = group.summary["robustness"].get(axis, {}).get("verdict", "")
            ax.set(title=f"{group.id}: {axis}", xlabel=f"{axis} ({unit})" if unit else axis)
            ax.set_ylabel(group.setting["metric"])
            ax.text(0.02, 0.02, f"AUC: {verdict}", transform=ax.transAxes, fontsize=6, wrap=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_plots(groups: list[Group], out_dir: Path) -> list[str]:
    """Write the plots that the groups have data for into ``out_dir``; return their file names."""
    if not groups:
        return []
    names = []
    plot_curves(groups, out_dir / CURVES)
    plot_cost(groups, out_dir / COST)
    names += [CURVES, COST]
    paired = [g for g in groups if g.summary["difference"]["n"] or g.summary["cost"]["epoch_time_ratio"]["n"]]
    if paired:
        plot_differences(paired, out_dir / DIFFERENCES)
        names.append(DIFFERENCES)
    robust = [g for g in groups if g.summary["robustness"]]
    if robust:
        plot_robustness(robust, out_dir / ROBUSTNESS)
        names.append(ROBUSTNESS)
    return names
