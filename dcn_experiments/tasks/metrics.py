"""Streaming metrics: ``update(logits, target)``, ``compute()``, ``reset()``, ``reduce()`` (DDP).

State lives on the device of the first update; ignored targets are masked out.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _all_reduce(t: Tensor) -> None:
    # Imported here: the engine package imports the tasks (the one all-reduce lives in the engine).
    from dcn_experiments.engine.distributed import all_reduce_

    all_reduce_(t)


class Accuracy:
    """Top-1 classification accuracy."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.counts = torch.zeros(2, dtype=torch.long)  # correct, total

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of ``logits`` (N, C) against integer ``target`` (N,)."""
        if self.counts.device != logits.device:
            self.counts = self.counts.to(logits.device)
        correct = (logits.argmax(dim=1) == target).sum()
        self.counts += torch.stack([correct, torch.tensor(target.numel(), device=logits.device)])

    def reduce(self) -> None:
        """Sum the counts over all DDP processes."""
        _all_reduce(self.counts)

    def state_dict(self) -> dict[str, Tensor]:
        """The counts so far (for a checkpoint taken mid-epoch)."""
        return {"counts": self.counts.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from :meth:`state_dict`."""
        self.counts = state["counts"].clone()

    def compute(self) -> dict[str, float]:
        """``{"acc": correct / total}`` (0 before any update)."""
        correct, total = self.counts.tolist()
        return {"acc": correct / total if total else 0.0}


class ConfusionMatrix:
    """Confusion matrix over ``num_classes``; gives pixel accuracy, per-class IoU and mIoU.

    mIoU averages IoU over the classes that occur in prediction or target (a class with an
    empty union has no IoU and is left out, reported as NaN per class).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add ``logits`` (N, K, H, W) (or class predictions (N, H, W)) against ``target`` (N, H, W)."""
        prediction = logits.argmax(dim=1) if logits.dim() == target.dim() + 1 else logits
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        index = target[keep].long() * self.num_classes + prediction[keep].long()
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def reduce(self) -> None:
        """Sum the matrix over all DDP processes."""
        _all_reduce(self.matrix)

    def state_dict(self) -> dict[str, Tensor]:
        """The matrix so far (for a checkpoint taken mid-epoch)."""
        return {"matrix": self.matrix.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from :meth:`state_dict`."""
        self.matrix = state["matrix"].clone()

    def per_class_iou(self) -> Tensor:
        """IoU per class (NaN where the class is absent from both prediction and target)."""
        m = self.matrix.double()
        intersection = m.diag()
        union = m.sum(0) + m.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))

    def compute(self) -> dict[str, float | list[float]]:
        """``miou``, ``pixel_acc`` and ``per_class_iou`` (a list, NaN for absent classes)."""
        m = self.matrix.double()
        total = m.sum().item()
        iou = self.per_class_iou()
        present = ~torch.isnan(iou)
        return {
            "miou": iou[present].mean().item() if present.any() else 0.0,
            "pixel_acc": m.diag().sum().item() / total if total else 0.0,
            "per_class_iou": iou.tolist(),
        }
