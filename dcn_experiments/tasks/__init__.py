"""Tasks: loss + metrics per problem type. Importing this package registers every task."""

from dcn_experiments.tasks import classification, segmentation  # noqa: F401 - registers tasks
from dcn_experiments.tasks.base import TASKS, Metric, Task
from dcn_experiments.tasks.metrics import Accuracy, ConfusionMatrix

__all__ = ["TASKS", "Accuracy", "ConfusionMatrix", "Metric", "Task"]
