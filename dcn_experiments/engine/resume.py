"""Finding and checking the checkpoint a run resumes from (``trainer.resume=auto|PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcn_experiments.engine.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from dcn_experiments.errors import ConfigError, DataError

# Config sections that decide what is trained: a checkpoint only continues the same experiment.
SAME_EXPERIMENT = ("model", "conv", "dataset")
# Keys of those sections that may differ on resume (they do not change what is computed).
MAY_DIFFER = {("dataset", "num_workers"), ("dataset", "root"), ("dataset", "download"), ("conv", "cuda_kernel")}


def resume_checkpoint(setting: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: None (fresh run), the run folder's own ``last.pt`` for
    ``auto`` when there is one (a requeued job), or the given path (which must exist)."""
    if setting in (None, "", "none", "null", False):
        return None
    if setting == "auto":
        own = run_dir / "checkpoints" / "last.pt"
        return own if own.is_file() else None
    path = Path(str(setting)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints").is_dir() else path / "last.pt"
    if not path.is_file():
        raise ConfigError(
            f"trainer.resume={setting}: no checkpoint at {path}; give a last.pt/best.pt file or a run folder, "
            "or trainer.resume=auto"
        )
    return path


def load_resume_state(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint to resume ``config`` from; one-line errors for truncated, foreign or
    mismatching checkpoints (a different model, conv or dataset)."""
    try:
        state = read_checkpoint(path)
    except DataError as error:
        raise DataError(f"cannot resume from {error}; start afresh without trainer.resume") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"cannot resume from {path}: written by an older version, without the RNG and data-order state "
            "an exact resume needs; start afresh without trainer.resume"
        )
    saved = state["config"]
    for section in SAME_EXPERIMENT:
        old, new = saved.get(section, {}), config.get(section, {})
        for key in sorted(set(old) | set(new)):
            if (section, key) in MAY_DIFFER or old.get(key) == new.get(key):
                continue
            raise ConfigError(
                f"cannot resume from {path}: it was trained with {section}.{key}={old.get(key)!r}, this run has "
                f"{section}.{key}={new.get(key)!r}; resume with the checkpoint's settings or start a new run"
            )
    return state
