"""Accuracy and confusion-matrix mIoU on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from dcn_experiments.tasks import Accuracy, ConfusionMatrix


def test_accuracy_counts() -> None:
    metric = Accuracy()
    assert metric.compute() == {"acc": 0.0}
    metric.update(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert metric.compute()["acc"] == pytest.approx(2 / 3)
    metric.reset()
    assert metric.compute()["acc"] == 0.0


def test_perfect_prediction_gives_miou_one() -> None:
    target = torch.tensor([[[0, 1], [2, 2]]])
    metric = ConfusionMatrix(3)
    metric.update(target, target)  # class predictions directly
    result = metric.compute()
    assert result["miou"] == 1.0 and result["pixel_acc"] == 1.0


def test_hand_computed_iou_with_absent_class_and_ignore_pixels() -> None:
    # target:     prediction:
    # 0 0 1 255   0 1 1 2
    # 0 1 1 1     0 0 1 1
    target = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 1]]])
    prediction = torch.tensor([[[0, 1, 1, 2], [0, 0, 1, 1]]])
    metric = ConfusionMatrix(4, ignore_index=255)
    metric.update(prediction, target)
    iou = metric.per_class_iou()
    # class 0: inter 2, union (3 target + 3 pred - 2) = 4 -> 0.5 ; class 1: inter 3, union 4 + 4 - 3 = 5 -> 0.6
    assert iou[0].item() == pytest.approx(0.5) and iou[1].item() == pytest.approx(0.6)
    assert math.isnan(iou[2].item()) and math.isnan(iou[3].item())  # the '2' sits on an ignored pixel
    result = metric.compute()
    assert result["miou"] == pytest.approx(0.55)
    assert result["pixel_acc"] == pytest.approx(5 / 7)


def test_logits_are_argmaxed_and_updates_accumulate() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = 1.0  # predicts [0, 1]
    metric = ConfusionMatrix(2)
    metric.update(logits, torch.tensor([[[0, 1]]]))
    metric.update(logits, torch.tensor([[[1, 1]]]))
    assert metric.matrix.tolist() == [[1, 0], [1, 2]]
    metric.reset()
    assert metric.matrix.sum() == 0 and metric.compute()["miou"] == 0.0
