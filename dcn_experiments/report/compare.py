"""Comparison report of a sweep: one row per run, deformable/regular ratios, PNG plots."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dcn_experiments.engine.results import FAILED, RUN_RECORD_FILE, RunRecordError, headline_metric, read_run_record
from dcn_experiments.errors import DataError

log = logging.getLogger(__name__)
REPORT_FILE = "report.md"
MISSING, UNREADABLE = "missing", "unreadable"


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every run below ``sweep_dir`` (sorted by path) with ``run_dir`` and ``overrides`` added.

    A run is a folder with a ``metrics.json`` or a Hydra job folder (``.hydra/``). Runs that cannot
    be compared are kept, never skipped: a job folder without a record gets ``status: missing``, a
    corrupt record ``status: unreadable``, each with a ``reason``.
    """
    folders = {p.parent for p in sweep_dir.rglob(RUN_RECORD_FILE)}
    folders |= {p.parent for p in sweep_dir.rglob(".hydra") if (p / "overrides.yaml").is_file()}
    folders.discard(sweep_dir)  # a sweep folder's own .hydra is not a job
    runs = []
    for folder in sorted(folders):
        path = folder / RUN_RECORD_FILE
        if not path.is_file():
            run: dict[str, Any] = {"status": MISSING, "reason": f"no {RUN_RECORD_FILE}: the job never finished"}
        else:
            try:
                run = read_run_record(path)
            except RunRecordError as error:
                run = {"status": UNREADABLE, "reason": str(error)}
        run["run_dir"] = str(folder.relative_to(sweep_dir))
        run["overrides"] = _shared_overrides(folder / ".hydra" / "overrides.yaml")
        runs.append(run)
    return runs


def trained(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that trained (completed or diverged): the ones with numbers to compare."""
    return [r for r in runs if r.get("status") not in (FAILED, MISSING, UNREADABLE)]


def failed_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that failed, are missing their record, or whose record is unreadable."""
    return [r for r in runs if r.get("status") in (FAILED, MISSING, UNREADABLE)]


def metric_key(run: dict[str, Any]) -> str:
    """The headline metric of a run: ``val_acc`` or ``val_miou``."""
    return headline_metric(run)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _shared_overrides(overrides_file: Path) -> list[str]:
    """The command-line overrides both arms of a pair must share: all but ``conv=``, ``seed=``
    (the seed is a column of its own) and Hydra's own settings."""
    if not overrides_file.is_file():
        return []
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(overrides_file))]
    return sorted(o for o in overrides if not o.startswith(("conv=", "seed=", "hydra.", "+hydra.")))


def _pair_key(run: dict[str, Any]) -> tuple:
    # Runs of one sweep that differ in anything but the conv choice (a learning rate, a placement)
    # must not be compared with each other.
    return (
        run.get("task"),
        run.get("model"),
        run.get("dataset"),
        run.get("seed"),
        tuple(run.get("overrides", ())),
    )


def pair_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deformable vs regular for every (task, model, dataset, seed, other overrides) with both arms."""
    regular = {_pair_key(r): r for r in runs if r.get("conv") == "regular"}
    pairs = []
    for run in runs:
        base = regular.get(_pair_key(run))
        if run.get("conv") != "deformable" or base is None:
            continue
        key = metric_key(run)

        def ratio(a: Any, b: Any) -> float:
            return a / b if a is not None and b else math.nan

        pairs.append(
            {
                "model": run.get("model"),
                "dataset": run.get("dataset"),
                "seed": run.get("seed"),
                "placement": run.get("placement"),
                "overrides": " ".join(run.get("overrides", ())) or "-",
                "metric": key,
                "regular": base.get(key),
                "deformable": run.get(key),
                "delta": (run.get(key) - base.get(key))
                if run.get(key) is not None and base.get(key) is not None
                else math.nan,
                "time_ratio": ratio(run.get("epoch_time_s"), base.get("epoch_time_s")),
                "throughput_ratio": ratio(run.get("train_throughput_img_s"), base.get("train_throughput_img_s")),
                "params_ratio": ratio(run.get("params"), base.get("params")),
            }
        )
    return pairs


def render_markdown(all_runs: list[dict[str, Any]], plots: list[str]) -> str:
    """The report text: runs table, ratios table, failed runs, plot links."""
    runs = trained(all_runs)
    lines = ["# Regular vs deformable convolutions", ""]
    lines += [
        "| run | model | conv | placement | dataset | seed | params | val metric | value | val loss | epoch time (s) | throughput (img/s) |",  # noqa: E501
        "|---|---|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        key = metric_key(run)
        lines.append(
            f"| {run['run_dir']} | {run.get('model')} | {run.get('conv')} | "
            f"{run.get('placement') if run.get('conv') == 'deformable' else '-'} | {run.get('dataset')} | "
            f"{run.get('seed')} | {run.get('params', 0):,} | {key} | {_fmt(run.get(key))} | "
            f"{_fmt(run.get('val_loss'))} | "
            f"{_fmt(run.get('epoch_time_s'), 2)} | {_fmt(run.get('train_throughput_img_s'), 1)} |"
        )
    pairs = pair_ratios(runs)
    lines += ["", "## Deformable / regular", ""]
    if pairs:
        lines += [
            "| model | dataset | seed | placement | overrides | metric | regular | deformable | delta | epoch time x | throughput x | params x |",  # noqa: E501
            "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['model']} | {p['dataset']} | {p['seed']} | {p['placement']} | {p['overrides']} | "
                f"{p['metric']} | "
                f"{_fmt(p['regular'])} | {_fmt(p['deformable'])} | {_fmt(p['delta'])} | {_fmt(p['time_ratio'], 2)} | "
                f"{_fmt(p['throughput_ratio'], 2)} | {_fmt(p['params_ratio'], 3)} |"
            )
    else:
        lines.append("No regular/deformable pair with the same model, dataset, seed and other overrides in this sweep.")
    diverged = [r["run_dir"] for r in runs if r.get("diverged")]
    if diverged:
        lines += ["", f"**Diverged (non-finite loss):** {', '.join(diverged)}"]
    failed = failed_runs(all_runs)
    if failed:
        lines += ["", f"## Failed runs ({len(failed)} of {len(all_runs)})", ""]
        lines += ["| run | status | reason |", "|---|---|---|"]
        lines += [f"| {r['run_dir']} | {r['status']} | {str(r.get('reason', '')).replace('|', '/')} |" for r in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Write ``curves.png`` (val metric and train loss per epoch) and ``cost.png``; return file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        key = metric_key(run)
        epochs = run.get("epochs") or []
        label = f"{run.get('model')} {run.get('conv')} (seed {run.get('seed')})"
        xs = [e["epoch"] for e in epochs]
        axes[0].plot(xs, [e.get(key) for e in epochs], marker="o", label=label)
        axes[1].plot(xs, [e.get("train_loss") for e in epochs], marker="o", label=label)
    keys = sorted({metric_key(run) for run in runs})
    axes[0].set(xlabel="epoch", ylabel=" / ".join(keys), title="Validation metric")
    axes[1].set(xlabel="epoch", ylabel="train loss", title="Training loss")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
    names.append("curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r.get('model')}\n{r.get('conv')}\nseed {r.get('seed')}" for r in runs]
    ax.bar(range(len(runs)), [r.get("epoch_time_s") or 0 for r in runs], color="tab:blue")
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    ax.set(ylabel="seconds per training epoch (median)", title="Cost")
    fig.tight_layout()
    fig.savefig(out_dir / "cost.png", dpi=100)
    plt.close(fig)
    names.append("cost.png")
    return names


def write_report(sweep_dir: Path) -> str:
    """Write ``report.md`` (+ plots) into ``sweep_dir`` from the runs below it; return the markdown."""
    if not sweep_dir.is_dir():
        raise DataError(f"sweep folder not found: {sweep_dir}; pass the folder a `dcn-train -m` run wrote")
    runs = collect_runs(sweep_dir)
    if not runs:
        raise DataError(f"no {RUN_RECORD_FILE} found under {sweep_dir}; is this a dcn-train multirun folder?")
    plots = plot_runs(trained(runs), sweep_dir) if trained(runs) else []
    text = render_markdown(runs, plots)
    tmp = sweep_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(sweep_dir / REPORT_FILE)
    return text
