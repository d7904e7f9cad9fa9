"""``dcn-eval RUN_DIR [RUN_DIR ...]``: robustness of trained runs to rotation, scaling and translation.

Each run's model (``checkpoints/last.pt``, rebuilt from the config inside it) is evaluated on the
run's own validation batches (``trainer.limit_val_batches`` applies), clean and under one
perturbation axis at a time (see :mod:`dcn_experiments.data.perturb`); the clean value equals the
run's final validation metric. Writes ``robustness.json`` and ``robustness.png`` into each run
folder; with several runs also a combined plot (one line per arm, min-max band over seeds).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from dcn_experiments.cli import exit_on_user_error, one_line
from dcn_experiments.data import make_loader
from dcn_experiments.data.perturb import AXES, black_level, perturb
from dcn_experiments.engine import read_checkpoint, read_run_record, resolve_device, write_json_atomic
from dcn_experiments.engine.evaluate import BatchTransform, evaluate_many
from dcn_experiments.engine.results import FAILED, ROBUSTNESS_FILE, RUN_RECORD_FILE, RunRecordError, headline_metric
from dcn_experiments.errors import ConfigError, DataError, UserError
from dcn_experiments.tasks import TASKS
from dcn_experiments.train import build_data, build_model

log = logging.getLogger(__name__)

ROBUSTNESS_PLOT = "robustness.png"
ROBUSTNESS_SCHEMA_VERSION = 1
CHECKPOINT = Path("checkpoints") / "last.pt"
CLEAN = "clean"
# Identity keys that tell arms apart in the combined plot (the seed never does).
ARM_KEYS = ("conv", "model", "dataset", "placement", "conv_version", "offset_lr_mult")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_run(run_dir: Path) -> Path:
    """The checkpoint of an evaluable run folder; a one-line error for a missing, unfinished or failed run."""
    if not run_dir.is_dir():
        raise DataError(f"run folder not found: {run_dir}; pass a folder written by dcn-train (its Hydra run dir)")
    record_path = run_dir / RUN_RECORD_FILE
    if record_path.is_file():
        try:
            record = read_run_record(record_path)
        except RunRecordError as error:
            raise DataError(f"{error}; restore it or re-run the training") from None
        if record.get("status") == FAILED:
            reason = record.get("reason") or "no reason recorded"
            raise DataError(f"{run_dir} is a failed run ({reason}); it has no trained model to evaluate")
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise DataError(f"no checkpoint at {checkpoint}; the run never finished an epoch: nothing to evaluate")
    return checkpoint


def _device_for(name: str | None, trained_on: str, run_dir: Path) -> torch.device:
    if name is not None:
        return resolve_device(name)
    try:
        return resolve_device(trained_on)
    except ConfigError:
        raise ConfigError(
            f"{run_dir} was trained on {trained_on}, which this machine lacks; pass --device cpu "
            "(the clean value may then differ slightly from the run's metrics.json)"
        ) from None


def _perturbation(axis: str, strength: float, ignore_index: int, fill: list[float]) -> BatchTransform:
    def transform(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if targets.dim() == 3:  # segmentation masks (N, H, W) move with the image
            return perturb(images, targets, axis, strength, ignore_index, fill)
        return perturb(images, None, axis, strength, ignore_index, fill)[0], targets

    return transform


def mean_over_strengths(strengths: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``strengths``, divided by the strength range (the curve's mean)."""
    area = sum((values[i] + values[i + 1]) / 2 * (strengths[i + 1] - strengths[i]) for i in range(len(values) - 1))
    return area / (strengths[-1] - strengths[0])


def model_from_checkpoint(checkpoint: dict[str, Any], checkpoint_path: Path) -> tuple[str, Any, torch.nn.Module]:
    """Rebuild a run's task name, data and model from a checkpoint's stored config, with its weights loaded.

    A config or weights that are not a dcn-train run's raise a one-line ``DataError`` naming the file.
    """
    cfg = OmegaConf.create(checkpoint["config"])
    try:
        task_name, data = build_data(cfg)
        model = build_model(cfg, data)
    except (AttributeError, KeyError) as error:
        raise DataError(f"{checkpoint_path}: its config is not a dcn-train config ({one_line(error)[:160]})") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise DataError(
            f"{checkpoint_path}: its weights do not fit the model its config describes "
            f"({one_line(error)[:200]}); the checkpoint is not from a dcn-train run"
        ) from None
    return task_name, data, model


def evaluate_robustness(run_dir: Path, output: Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate one run clean and under each perturbation axis; write robustness.json + robustness.png.

    ``output`` is the folder for the two files (default ``run_dir``); ``device`` is auto|cpu|cuda
    (default: the device the run trained on). Returns the robustness.json content.
    """
    run_dir = Path(run_dir)
    checkpoint_path = check_run(run_dir)
    checkpoint = read_checkpoint(checkpoint_path)
    cfg = OmegaConf.create(checkpoint["config"])
    identity = dict(checkpoint.get("identity") or {})
    if checkpoint.get("step_in_epoch"):
        log.warning(
            "%s was written in the middle of epoch %s (the run did not finish): its model was never validated",
            checkpoint_path,
            int(checkpoint.get("epoch") or 0) + 1,
        )
    target = _device_for(device, identity.get("device") or cfg.device.name, run_dir)

    task_name, data, model = model_from_checkpoint(checkpoint, checkpoint_path)
    model.to(target)
    task = TASKS.build(
        task_name, num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names
    )
    loader = make_loader(
        data.val,
        batch_size=cfg.dataset.batch_size,
        num_workers=0,
        shuffle=False,
        seed=cfg.seed,
        device=target,
        name="validation",
    )
    fill = black_level(data.val)
    transforms: dict[str, BatchTransform | None] = {CLEAN: None}
    for axis, spec in AXES.items():
        for strength in spec.strengths:
            if strength != spec.identity:
                transforms[f"{axis}={strength}"] = _perturbation(axis, strength, data.ignore_index, fill)
    trainer_cfg = cfg.trainer
    amp_dtype = AMP_DTYPES.get(trainer_cfg.get("amp_dtype", "bfloat16")) if trainer_cfg.get("amp", False) else None
    results = evaluate_many(
        model, task, loader, target, trainer_cfg.get("limit_val_batches"), transforms, amp_dtype=amp_dtype
    )

    metric = headline_metric({"task": task_name})
    key = task.metric_key
    clean = results[CLEAN][key]
    axes, auc = {}, {}
    for axis, spec in AXES.items():
        names = [CLEAN if s == spec.identity else f"{axis}={s}" for s in spec.strengths]
        values = [results[name][key] for name in names]
        axes[axis] = {
            "unit": spec.unit,
            "strengths": list(spec.strengths),
            "values": values,
            "losses": [results[name]["loss"] for name in names],
        }
        auc[axis] = mean_over_strengths(spec.strengths, values)
    robustness = {
        "schema_version": ROBUSTNESS_SCHEMA_VERSION,
        "metric": metric,
        "clean": clean,
        "axes": axes,
        "auc": auc,
        "images": results[CLEAN]["images"],
        "image_fill": fill,
        "mask_fill": data.ignore_index if task_name == "segmentation" else None,
        "device": target.type,
        "run": identity,
    }
    _warn_if_not_reproduced(run_dir, metric, clean)
    folder = Path(output) if output is not None else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / ROBUSTNESS_FILE, robustness)
    described = " ".join(str(identity[k]) for k in ("model", "conv") if k in identity)
    seed = f" seed {identity['seed']}" if "seed" in identity else ""
    plot_run(robustness, folder / ROBUSTNESS_PLOT, title=f"{run_dir.resolve().name}: {described}{seed}")
    return robustness


def _warn_if_not_reproduced(run_dir: Path, metric: str, clean: float) -> None:
    record_path = run_dir / RUN_RECORD_FILE
    if not record_path.is_file():
        return
    recorded = read_run_record(record_path).get(metric)
    if isinstance(recorded, int | float) and recorded != clean and not (math.isnan(recorded) and math.isnan(clean)):
        log.warning(
            "%s: clean %s %.6f differs from the recorded %.6f (another device, thread count or kernel?)",
            run_dir,
            metric,
            clean,
            recorded,
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(robustness: dict[str, Any], path: Path, title: str = "") -> None:
    """One panel per axis: the metric against the perturbation strength, clean value dashed."""
    plt = _pyplot()
    fig, panels = plt.subplots(1, len(AXES), figsize=(12, 3.6), sharey=True)
    for panel, (axis, curve) in zip(panels, robustness["axes"].items(), strict=True):
        panel.plot(curve["strengths"], curve["values"], marker="o")
        panel.axhline(robustness["clean"], color="grey", linestyle="--", linewidth=1, label="clean")
        panel.set(xlabel=f"{axis} ({curve['unit']})", title=f"{axis}: mean {robustness['auc'][axis]:.3f}")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel(robustness["metric"])
    panels[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def arm_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A label per run naming its arm: the conv, plus every other identity key (not the seed) that varies."""
    varying = [k for k in ARM_KEYS[1:] if len({str(r.get("run", {}).get(k)) for r in runs}) > 1]
    labels = []
    for run in runs:
        identity = run.get("run", {})
        parts = [str(identity.get("conv", "?"))] + [f"{k}={identity.get(k)}" for k in varying]
        labels.append(" ".join(parts))
    return labels


def plot_arms(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per axis: per arm the mean over seeds as a line and the min-max over seeds as a band."""
    plt = _pyplot()
    arms: dict[str, list[dict[str, Any]]] = {}
    for label, run in zip(arm_labels(runs), runs, strict=True):
        arms.setdefault(label, []).append(run)
    fig, panels = plt.subplots(1, len(AXES), figsize=(13, 4), sharey=True)
    for panel, (axis, spec) in zip(panels, AXES.items(), strict=True):
        for label, members in arms.items():
            values = np.array(
                [[math.nan if v is None else v for v in r["axes"][axis]["values"]] for r in members], dtype=float
            )
            strengths = members[0]["axes"][axis]["strengths"]
            (line,) = panel.plot(strengths, np.nanmean(values, axis=0), marker="o", label=f"{label} (n={len(members)})")
            panel.fill_between(
                strengths, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.2
            )
        panel.set(xlabel=f"{axis} ({spec.unit})", title=axis)
        panel.grid(alpha=0.3)
    panels[0].set_ylabel(" / ".join(sorted({r["metric"] for r in runs})))
    panels[0].legend(fontsize=8)
    fig.suptitle("Robustness: mean over seeds, band = min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def combined_plot_path(run_dirs: Sequence[Path], output: Path | None) -> Path:
    """Where the combined plot goes: ``output`` (a .png file or a folder), else the runs' common parent."""
    if output is not None:
        return output if output.suffix.lower() == ".png" else output / ROBUSTNESS_PLOT
    resolved = [p.resolve() for p in run_dirs]
    common = Path(os.path.commonpath(resolved))
    if common in resolved:
        raise UserError(
            f"the runs' common folder {common} is itself one of the runs; pass --output PATH for the combined plot"
        )
    return common / ROBUSTNESS_PLOT


def _summary(run_dir: Path, robustness: dict[str, Any]) -> str:
    means = "  ".join(f"{axis} {value:.4f}" for axis, value in robustness["auc"].items())
    return f"{run_dir}: {robustness['metric']} clean {robustness['clean']:.4f} | mean under {means}"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate each run, write the files, print one summary line per run."""
    parser = argparse.ArgumentParser(prog="dcn-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="folders written by dcn-train")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="combined plot: a .png path or a folder (default: the runs' common parent; only with 2+ runs)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the device each run trained on"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for run_dir in args.run_dirs:  # fail fast, before any evaluation
        check_run(run_dir)
    combined = None
    if len(args.run_dirs) > 1 or args.output is not None:
        combined = combined_plot_path(args.run_dirs, args.output)
    results = []
    for run_dir in args.run_dirs:
        robustness = evaluate_robustness(run_dir, device=args.device)
        results.append(robustness)
        print(_summary(run_dir, robustness))
        print(f"wrote {run_dir / ROBUSTNESS_FILE} and {run_dir / ROBUSTNESS_PLOT}", file=sys.stderr)
    if combined is not None:
        combined.parent.mkdir(parents=True, exist_ok=True)
        plot_arms(results, combined)
        print(f"wrote {combined}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
