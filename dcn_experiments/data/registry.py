"""The dataset registry (names are the options of the ``dataset`` config group)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset

from dcn_experiments.registry import Registry

DATASETS = Registry(
    "dataset",
    contract=(
        "builder(task: str, seed: int, **dataset_cfg) -> DataSplits; registered with tasks=(...) "
        "naming the tasks it can serve ('classification', 'segmentation')"
    ),
)


@dataclass
class DataSplits:
    """Train and validation datasets plus what the model and metrics need to know about them.

    Classification items are ``(image float[3,H,W], label int)``; segmentation items are
    ``(image float[3,H,W], mask int64[H,W])`` with 0 = background and ``ignore_index`` = unlabeled.
    ``caveats`` lists what makes the data differ from the official set (logged already; record them).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = 255
    caveats: list[str] = field(default_factory=list)
