"""Datasets and transforms. Importing this package registers every dataset."""

from dcn_experiments.data import cifar, coco_dataset, imagefolder, shapes  # noqa: F401 - registers datasets
from dcn_experiments.data.loaders import make_loader
from dcn_experiments.data.registry import DATASETS, DataSplits

__all__ = ["DATASETS", "DataSplits", "make_loader"]
