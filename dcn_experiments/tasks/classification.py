"""Image classification: cross-entropy and top-1 accuracy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dcn_experiments.tasks.base import TASKS
from dcn_experiments.tasks.metrics import Accuracy


class Classification:
    """Cross-entropy over ``num_classes`` logits; headline metric ``acc``."""

    name = "classification"
    metric_key = "acc"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = class_names or []

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy."""
        return F.cross_entropy(logits, target)

    def make_metric(self) -> Accuracy:
        """A fresh accuracy counter."""
        return Accuracy()

    def final_details(self, metric: Accuracy) -> dict:
        """Nothing beyond the headline accuracy."""
        return {}


@TASKS.register("classification")
def classification(num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> Classification:
    """Build the classification task."""
    return Classification(num_classes, ignore_index, class_names)
