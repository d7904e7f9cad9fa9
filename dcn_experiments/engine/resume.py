"""Finding and checking the checkpoint a run resumes from (``trainer.resume=auto|PATH``)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from dcn_experiments.engine.checkpoint import load_checkpoint
from dcn_experiments.errors import ConfigError, DataError

# Config sections that decide what is trained: a checkpoint only continues the same experiment.
SAME_EXPERIMENT = ("model", "conv", "dataset")
# Keys of those sections that may differ on resume (they do not change what is computed).
MAY_DIFFER = {("dataset", "num_workers"), ("dataset", "root"), ("dataset", "download")}
CHECKPOINT_FORMAT = "dcn-experiments-checkpoint"


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
        state = load_checkpoint(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"cannot resume from {path}: the file is truncated or not a PyTorch checkpoint ({first}); "
            "use best.pt or start afresh without trainer.resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise DataError(
            f"cannot resume from {path}: not a dcn-experiments training checkpoint (written by another tool "
            "or an older version); start afresh without trainer.resume"
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
