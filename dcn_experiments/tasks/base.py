"""The task registry and the interface every task implements."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from dcn_experiments.registry import Registry

TASKS = Registry(
    "task",
    contract=(
        "builder(num_classes: int, ignore_index: int, class_names: list[str]) -> Task. Tasks are chosen "
        "by the model (registered with task=...), not by a config group of their own"
    ),
)


class Metric(Protocol):
    """What the engine needs from a metric."""

    def reset(self) -> None: ...
    def update(self, logits: Tensor, target: Tensor) -> None: ...
    def reduce(self) -> None: ...
    def compute(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    """A task turns logits and targets into a loss and metrics.

    ``metric_key`` names the headline metric (``acc`` or ``miou``) used in metrics.json
    (``val_<key>``), TensorBoard (``val/<key>``) and the comparison report.
    """

    name: str
    metric_key: str

    def loss(self, logits: Tensor, target: Tensor) -> Tensor: ...
    def make_metric(self) -> Metric: ...
    def final_details(self, metric: Metric) -> dict: ...
