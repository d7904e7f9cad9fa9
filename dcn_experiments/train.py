"""``dcn-train``: compose data, model, task and engine from the Hydra config, train, record.

``train(cfg)`` is plain Python (tests call it); ``main`` is the Hydra entry point and returns the
final validation metric so that sweepers can optimise it. In a sweep every job runs in a child
process and a failing job (an error, an exception, a native crash) is recorded as failed in its
own folder while the other jobs go on; the report callback then names it and the sweep exits 1.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dcn_experiments.cli import CONFIG_DIR, check_overrides, exit_on_user_error, one_line
from dcn_experiments.data import DATASETS, DataSplits, make_loader
from dcn_experiments.engine import (
    Trainer,
    TrainerSettings,
    build_optimizer,
    build_schedule,
    headline_value,
    record_failure,
    run_isolated_job,
    summarize_run,
    write_run_record,
)
from dcn_experiments.engine.distributed import context_from_environment, shutdown_distributed
from dcn_experiments.engine.environment import environment
from dcn_experiments.engine.evaluate import batch_limit
from dcn_experiments.engine.launch import concurrent_jobs, pin_output_dir
from dcn_experiments.engine.resume import load_resume_state, resume_checkpoint
from dcn_experiments.engine.scale import (
    apply_thread_budget,
    make_logger,
    placement,
    precision_of,
    prepare_model,
    scale_record,
)
from dcn_experiments.engine.tensorboard import TensorBoardLogger
from dcn_experiments.engine.trainer import TrainingStoppedError
from dcn_experiments.errors import ConfigError
from dcn_experiments.models import CONVS, MODELS, deformable_layers, flops_breakdown
from dcn_experiments.ops import backend_usage, cpu_extension_available, precision_usage, reset_backend_usage
from dcn_experiments.report.offsets import offset_view_logger, write_offset_views
from dcn_experiments.tasks import TASKS

log = logging.getLogger("dcn_experiments")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _options(node: DictConfig, *drop: str) -> dict[str, Any]:
    """A config group node as builder kwargs (without its ``name`` and the keys in ``drop``)."""
    options = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in options.items() if k not in {"name", *drop}}


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a run is, as far as the config alone says (the record of a run that failed early)."""
    return {
        "task": MODELS.meta(cfg.model.name)["task"] if cfg.model.name in MODELS else None,
        "model": cfg.model.name,
        "conv": cfg.conv.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "placement": cfg.conv.placement,
        "conv_version": cfg.conv.version,
        "offset_lr_mult": cfg.conv.offset_lr_mult,
    }


def build_data(cfg: DictConfig) -> tuple[str, DataSplits]:
    """The task the configured model does, and the configured dataset's splits for it."""
    task_name = MODELS.meta(cfg.model.name)["task"]
    served = DATASETS.meta(cfg.dataset.name)["tasks"]
    if task_name not in served:
        raise ConfigError(
            f"model={cfg.model.name} does {task_name}, but dataset={cfg.dataset.name} provides "
            f"{' and '.join(served)} only; pick a {task_name} dataset or a model for {served[0]}"
        )
    data_cfg = _options(cfg.dataset, "batch_size", "num_workers")
    if data_cfg.get("root"):
        data_cfg["root"] = hydra.utils.to_absolute_path(os.path.expanduser(data_cfg["root"]))
    return task_name, DATASETS.build(cfg.dataset.name, task=task_name, seed=cfg.seed, **data_cfg)


def build_model(cfg: DictConfig, data: DataSplits) -> nn.Module:
    """The configured model (regular or deformable convolutions) for ``data``'s classes."""
    conv = CONVS.build(cfg.conv.name, **_options(cfg.conv))
    return MODELS.build(cfg.model.name, num_classes=data.num_classes, conv=conv, **_options(cfg.model))


def train(cfg: DictConfig, run_dir: Path, concurrent_jobs: int = 1) -> dict[str, Any]:
    """Train one model as configured, writing metrics.json, tb/ and checkpoints/ into ``run_dir``
    (under DDP: every rank trains, rank 0 writes). ``concurrent_jobs``: sweep jobs sharing the machine."""
    context, device = placement(cfg.device.name)
    apply_thread_budget(concurrent_jobs)
    precision = precision_of(cfg.trainer, device)
    seed_everything(cfg.seed)
    task_name, data = build_data(cfg)
    model = build_model(cfg, data).to(device)
    if device.type == "cpu" and any(True for _ in deformable_layers(model)):
        cpu_extension_available()  # build the C++ kernel now, not inside the first timed epoch
    task = TASKS.build(
        task_name, num_classes=data.num_classes, ignore_index=data.ignore_index, class_names=data.class_names
    )

    loader_args = {
        "batch_size": cfg.dataset.batch_size,
        "num_workers": cfg.dataset.num_workers,
        "seed": cfg.seed,
        "device": device,
        "rank": context.rank,
        "world_size": context.world_size,
    }
    train_loader = make_loader(data.train, shuffle=True, name="train", **loader_args)
    val_loader = make_loader(data.val, shuffle=False, name="validation", **loader_args)
    t = cfg.trainer
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = flops_breakdown(model, tuple(data.val[0][0].shape))
    train_net, eval_net = prepare_model(model, t, device, context)  # before the optimizer: SyncBN
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, t.momentum, cfg.conv.offset_lr_mult)
    steps = t.epochs * batch_limit(t.limit_train_batches, len(train_loader), "trainer.limit_train_batches")
    schedule = build_schedule(optimizer, t.schedule, steps, t.warmup_steps)
    if t.epochs < 1:
        raise ConfigError(f"trainer.epochs={t.epochs} must be >= 1")

    identity = {
        **config_identity(cfg),
        "params": params,
        "flops_per_image": sum(flops.values()),
        "flops_breakdown": flops,
        "device": device.type,
        "deformable_layers": sum(1 for _ in deformable_layers(model)),
    }
    log.info(
        "%s | %s conv (%d deformable layers) | %s | %d params | %s",
        cfg.model.name,
        cfg.conv.name,
        identity["deformable_layers"],
        cfg.dataset.name,
        params,
        device,
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume_from = resume_checkpoint(t.resume, run_dir)
    resume_state = load_resume_state(resume_from, resolved) if resume_from else None
    # On resume, TensorBoard drops whatever the stopped run logged after its checkpoint.
    logger = make_logger(run_dir, resume_state["epoch"] + 1 if resume_state else None, context)
    logger.text("config", f"```yaml\n{OmegaConf.to_yaml(cfg, resolve=True)}\n```")
    settings = TrainerSettings(
        t.epochs,
        t.limit_train_batches,
        t.limit_val_batches,
        str(t.precision),
        t.channels_last,
        t.grad_clip,
        t.progress,
        t.checkpoint_every_n_steps,
        t.skip_nonfinite,
    )
    view_images = torch.stack([data.val[i][0] for i in range(min(4, len(data.val)))]).to(device)
    trainer = Trainer(
        model,
        task,
        optimizer,
        schedule,
        device,
        settings,
        logger,
        run_dir / "checkpoints",
        {"config": resolved, "identity": identity, "world_size": context.world_size},
        epoch_end=offset_view_logger(model, view_images, logger.image) if context.is_main else None,
        train_net=train_net,
        eval_net=eval_net,
        dist_context=context,
    )
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        log.info(
            "resuming from %s: %d epoch(s) done, step %d of the next",
            resume_from,
            trainer.epochs_done,
            resume_state["step_in_epoch"],
        )
    reset_backend_usage()
    try:
        result = trainer.fit(train_loader, val_loader)
        metrics = summarize_run(identity, result.epochs, task.metric_key, result.final_details, result.diverged)
        if result.divergence:
            metrics["reason"] = result.divergence
        metrics["skipped_nonfinite_batches"] = result.skipped_nonfinite
        metrics["data_caveats"] = data.caveats  # e.g. a skipped checksum: it changes what was trained on
        metrics["resumed_from"] = str(resume_from) if resume_from else None
        metrics["environment"] = environment(device, concurrent_jobs, context.world_size, context.backend)
        metrics["deformable_backend"] = "+".join(sorted(backend_usage())) or "none"
        metrics.update(scale_record(t, precision, context, precision_usage(), cfg.dataset.batch_size))
        if not context.is_main:
            return metrics
        write_run_record(run_dir, metrics)
        _log_final(logger, cfg, task.metric_key, metrics, data.class_names)
        if identity["deformable_layers"]:
            write_offset_views(model, view_images, run_dir)
        if cfg.report.robustness and metrics["status"] == "completed":
            from dcn_experiments.eval import evaluate_robustness  # eval builds on this module

            logger.close()  # robustness.json is the evaluation's output, not the run's events
            evaluate_robustness(run_dir)
    except TrainingStoppedError as stop:
        log.warning(
            "%s; resume with the same command plus: trainer.resume=auto hydra.run.dir=%s", stop, run_dir.resolve()
        )
        raise
    finally:
        logger.close()
    return metrics


def _log_final(logger: TensorBoardLogger, cfg: DictConfig, key: str, metrics: dict, class_names: list[str]) -> None:
    hparams = {
        "model": cfg.model.name,
        "conv": cfg.conv.name,
        "dataset": cfg.dataset.name,
        "lr": cfg.trainer.lr,
        "batch": cfg.dataset.batch_size,
        "seed": cfg.seed,
        "placement": cfg.conv.placement,
    }
    finals = {f"final/val_{key}": metrics[f"val_{key}"], "final/val_loss": metrics["val_loss"]}
    logger.hparams(hparams, {k: float(v) for k, v in finals.items() if v is not None})
    if "per_class_iou" in metrics:
        rows = "\n".join(
            f"| {name} | {'n/a' if iou is None else f'{iou:.4f}'} |" for name, iou in metrics["per_class_iou"].items()
        )
        logger.text("per_class_iou", f"| class | IoU |\n|---|---|\n{rows}")


def train_and_record(cfg: DictConfig, run_dir: Path, concurrent_jobs: int = 1) -> dict[str, Any]:
    """:func:`train`; when it fails, a ``failed`` record with the one-line reason is left in ``run_dir``."""
    try:
        return train(cfg, run_dir, concurrent_jobs)
    except TrainingStoppedError:
        raise  # not a failure: the checkpoint is written and the run can be resumed
    except Exception as error:
        if context_from_environment().is_main:
            record_failure(run_dir, config_identity(cfg), one_line(error))
        raise


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train one configuration, return its final validation metric."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # By its module's name: under `python -m` this module is __main__, which a joblib worker cannot pickle.
        record_job = importlib.import_module("dcn_experiments.train").train_and_record
        job = functools.partial(record_job, concurrent_jobs=concurrent_jobs(HydraConfig.get()))
        return headline_value(run_isolated_job(job, cfg, run_dir, config_identity(cfg)))
    try:
        return headline_value(train_and_record(cfg, run_dir))
    except TrainingStoppedError as stop:
        sys.exit(stop.exit_code)  # the log already says how to resume


def cli() -> None:
    """Console script: bad overrides are one-line errors (exit 2); under torchrun the ranks agree on
    one run folder; then the Hydra entry point."""
    exit_on_user_error(check_overrides)(sys.argv[1:])
    sys.argv[1:] = exit_on_user_error(pin_output_dir)(sys.argv[1:])
    try:
        main()
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    cli()
