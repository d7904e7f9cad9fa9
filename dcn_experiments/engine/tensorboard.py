"""TensorBoard logging: scalars, images, hparams in the same run, and the resolved config as text."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter`` writing into ``<run_dir>/tb``."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        # purge_step: a resumed run hides the events a stopped one wrote at steps >= purge_step
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard + protobuf, ~50 ms per CLI start

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log each ``tag: value`` at ``step``."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an RGB uint8 image of shape (H, W, 3) at ``step``."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        """Log markdown text (TensorBoard renders it in the Text tab)."""
        self.writer.add_text(tag, markdown, step)

    def hparams(self, params: dict[str, object], final_metrics: dict[str, float]) -> None:
        """Record hyper-parameters and final metrics into this same run (not a sub-run).

        The metrics are also written as scalars under the same tags so the HParams tab finds them.
        """
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in params.items()}
        experiment, session_start, session_end = hparams(clean, final_metrics)
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary)
        for tag, value in final_metrics.items():
            self.writer.add_scalar(tag, value, 0)

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.flush()
        self.writer.close()


class NullLogger(TensorBoardLogger):
    """A logger that writes nothing (DDP ranks other than 0)."""

    def __init__(self) -> None:
        self.writer = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Discard."""

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Discard."""

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        """Discard."""

    def hparams(self, params: dict[str, object], final_metrics: dict[str, float]) -> None:
        """Discard."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""
