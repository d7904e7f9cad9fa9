"""Semantic segmentation: pixel-wise cross-entropy with an ignore label, confusion-matrix mIoU."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from dcn_experiments.tasks.base import TASKS
from dcn_experiments.tasks.metrics import ConfusionMatrix


class Segmentation:
    """Cross-entropy over K+1 classes (0 = background), ``ignore_index`` masked; metric ``miou``."""

    name = "segmentation"
    metric_key = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = class_names or [str(i) for i in range(num_classes)]

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over labelled pixels."""
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    def make_metric(self) -> ConfusionMatrix:
        """A fresh confusion matrix."""
        return ConfusionMatrix(self.num_classes, self.ignore_index)

    def final_details(self, metric: ConfusionMatrix) -> dict:
        """Pixel accuracy and per-class IoU by class name (None where a class never occurs)."""
        result = metric.compute()
        per_class = {
            name: (None if math.isnan(v) else v)
            for name, v in zip(self.class_names, result["per_class_iou"], strict=True)
        }
        return {"pixel_acc": result["pixel_acc"], "per_class_iou": per_class}


@TASKS.register("segmentation")
def segmentation(num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> Segmentation:
    """Build the segmentation task."""
    return Segmentation(num_classes, ignore_index, class_names)
