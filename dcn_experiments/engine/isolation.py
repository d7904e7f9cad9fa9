"""Run a sweep job in a fresh child process, so that a native crash (a segfault in a kernel, an
abort in the allocator) ends that job only, and record how it ended.

Hydra's basic launcher runs all jobs of a sweep in one process, where one job's SIGSEGV would end
the sweep, the other jobs and the report with it. Each job pays one interpreter start (~3 s).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log
from omegaconf import DictConfig, OmegaConf

from dcn_experiments.cli import one_line
from dcn_experiments.engine.results import FAILED, RUN_RECORD_FILE, read_run_record, record_failure, write_run_record
from dcn_experiments.engine.trainer import TrainingStoppedError
from dcn_experiments.errors import UserError

log = logging.getLogger(__name__)
Job = Callable[[DictConfig, Path], dict[str, Any]]


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, in words: ``exit code 2`` or ``killed by SIGSEGV (segmentation fault)``."""
    if exitcode is None:
        return "did not finish"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"killed by signal {-exitcode}"
    return f"killed by {sig.name} ({(signal.strsignal(sig) or 'signal').lower()})"


def run_in_child_process(target: Callable[..., Any], *args: Any) -> int:
    """Run ``target(*args)`` in a spawned (not forked) process; return its exit code (< 0: signal).

    ``target`` must be importable (a module-level function). The child is not a daemon, so it can
    start DataLoader workers of its own. Interrupting the parent stops the child.
    """
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, name="dcn-train-job")
    # The child re-applies the parent's global start method; a joblib (loky) worker's is "loky",
    # which a plain interpreter does not know (hydra#964's family): present "spawn" while starting.
    previous = multiprocessing.get_start_method(allow_none=True)
    foreign = previous not in (None, *multiprocessing.get_all_start_methods())
    if foreign:
        multiprocessing.set_start_method("spawn", force=True)
    try:
        process.start()
    finally:
        if foreign:
            multiprocessing.set_start_method(previous, force=True)
    try:
        process.join()
    except BaseException:
        process.terminate()
        process.join()
        raise
    return process.exitcode if process.exitcode is not None else -1


def _job_in_child(job: Job, config: dict, job_logging: dict, verbose: Any, run_dir: str) -> None:
    """Child-process body: Hydra's job logging (console + the run's log file), then the job.

    The job writes its own record, failed ones included; exit 2 after a user error, 1 after any
    other exception (its traceback goes to the run's log).
    """
    configure_log(OmegaConf.create(job_logging), verbose)
    try:
        job(OmegaConf.create(config), Path(run_dir))
    except UserError as error:
        log.error("error: %s", one_line(error))
        raise SystemExit(2) from None
    except TrainingStoppedError as stop:
        raise SystemExit(stop.exit_code) from None
    except Exception:
        log.exception("the run failed")
        raise SystemExit(1) from None


def run_isolated_job(job: Job, cfg: DictConfig, run_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Run ``job(cfg, run_dir)`` (importable) in its own process, inside a Hydra job; return the
    run's record. A job that died without recording why gets a ``failed`` record naming how it
    ended (the signal, for a native crash); ``identity`` describes the run in that record."""
    hydra_cfg = HydraConfig.get()
    verbose = hydra_cfg.verbose
    path = run_dir / RUN_RECORD_FILE
    stale = path.stat().st_mtime_ns if path.is_file() else None  # a record from before this job
    exitcode = run_in_child_process(
        _job_in_child,
        job,
        OmegaConf.to_container(cfg, resolve=True),
        OmegaConf.to_container(hydra_cfg.job_logging, resolve=True),
        OmegaConf.to_container(verbose) if OmegaConf.is_config(verbose) else verbose,
        str(run_dir),
    )
    fresh = path.is_file() and path.stat().st_mtime_ns != stale
    record = read_run_record(path) if fresh else None
    if exitcode != 0 and (record is None or record.get("status") != FAILED):
        reason = f"the training process was {describe_exit(exitcode)}"
        if exitcode in (130, 143):
            reason = "stopped by SIGINT/SIGTERM after writing a checkpoint; rerun the sweep with "
            reason += "hydra.sweep.dir=<this sweep> trainer.resume=auto to continue"
        elif exitcode < 0:
            reason += "; rerun this job alone (same overrides) to reproduce it"
        if record is not None:  # it finished its record, then died: keep the numbers, mark the death
            record = {**record, "status": FAILED, "reason": reason}
            write_run_record(run_dir, record)
        else:
            record = record_failure(run_dir, identity, reason)
    elif record is None:
        record = record_failure(run_dir, identity, "the training process ended without writing its run record")
    if record.get("status") == FAILED:
        log.error("job %s failed: %s", hydra_cfg.job.num, record.get("reason"))
    return record
