"""What the launcher decides for a run: its output folder, fixed once for all processes that share
it, and how many sweep jobs share the machine.

Hydra resolves ``${now:...}`` in ``hydra.run.dir``/``hydra.sweep.dir`` in every process that
composes the config (hydra#2070): each torchrun rank would pick its own folder, and a submitit job
resolves the sweep folder again on the node (and again when SLURM requeues it). So the folder is
resolved once, before Hydra runs (on rank 0 under torchrun, then broadcast), and passed to Hydra
as an explicit ``hydra.run.dir=``/``hydra.sweep.dir=`` override.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dcn_experiments.cli import CONFIG_DIR, CONFIG_NAME, parse_command_line, sweep_size
from dcn_experiments.engine.distributed import broadcast_object, init_distributed
from dcn_experiments.engine.scale import available_cores
from dcn_experiments.errors import ConfigError

SWEEP_JOBS_ENV = "DCN_SWEEP_JOBS"  # the number of jobs of the sweep being launched (set by dcn-train)
_PLAIN = re.compile(r"^[\w./-]+$")


def _resolve_dir(overrides: list[str], key: str) -> str:
    """``key`` of the config composed with ``overrides``, resolved now."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides, return_hydra_config=True)
            return str(OmegaConf.select(cfg, key))
    finally:
        GlobalHydra.instance().clear()


def _quoted(value: str) -> str:
    return value if _PLAIN.match(value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pin_output_dir(argv: list[str]) -> list[str]:
    """``argv`` plus an explicit output folder where Hydra would otherwise resolve it per process:
    under torchrun (every rank gets rank 0's ``hydra.run.dir``; ranks > 0 write no ``.hydra/`` and
    log to ``train_rank<N>.log``) and for a multirun (``hydra.sweep.dir``, fixed for the launcher's
    jobs and their requeues). Also tells the jobs how many jobs the sweep has."""
    parsed = parse_command_line(argv)
    if parsed is None:
        return argv
    overrides, multirun = parsed
    context = init_distributed()
    if context.enabled and multirun:
        raise ConfigError(
            "-m (multirun) under torchrun: start one torchrun per run, or sweep DDP jobs with "
            "hydra/launcher=submitit_slurm and hydra.launcher.tasks_per_node=<GPUs per node>"
        )
    if multirun:
        os.environ[SWEEP_JOBS_ENV] = str(sweep_size(overrides))
    elif not context.enabled:
        return argv
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in overrides if o.key_or_group == key]
    extra: list[str] = []
    if not (given and "${" not in str(given[-1].value())):
        fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
        folder = _resolve_dir(fixed, key) if context.is_main else None
        folder = broadcast_object(folder, context)
        extra.append(f"{key}={_quoted(folder)}")
    else:
        folder = str(given[-1].value())
    if context.enabled and not context.is_main:
        log_file = os.path.join(folder, f"train_rank{context.rank}.log")
        extra += ["hydra.output_subdir=null", f"hydra.job_logging.handlers.file.filename={_quoted(log_file)}"]
    return [*argv, *extra]


def concurrent_jobs(hydra_cfg: Any) -> int:
    """How many jobs of this sweep run side by side on this machine: the joblib launcher's
    ``n_jobs``, all jobs for ``submitit_local``, 1 for the basic launcher and SLURM (one
    allocation per job); never more than the sweep's jobs (or an optimising sweeper's batch)."""
    launcher = hydra_cfg.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    jobs = int(os.environ.get(SWEEP_JOBS_ENV, "0")) or None
    sweeper = hydra_cfg.get("sweeper") or {}
    batch = sweeper.get("n_jobs") if "optuna" in str(sweeper.get("_target_", "")).lower() else None
    limits = [n for n in (jobs, batch) if isinstance(n, int) and n > 0]
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs", -1))
        parallel = n_jobs if n_jobs > 0 else max(1, available_cores() + 1 + n_jobs)
    elif target.endswith("submitit_launcher.LocalLauncher"):
        parallel = min(limits) if limits else 1
    else:
        return 1
    return max(1, min([parallel, *limits]))
