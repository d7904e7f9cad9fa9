"""The registry mechanism, and that registries mirror the conf/ groups one-to-one."""

from __future__ import annotations

import pytest

from dcn_experiments.data import DATASETS
from dcn_experiments.engine.device import DEVICE_CHOICES
from dcn_experiments.errors import ConfigError
from dcn_experiments.models import CONVS, MODELS
from dcn_experiments.registry import Registry
from dcn_experiments.tasks import TASKS

from .conftest import CONF_DIR


def test_duplicate_name_raises_value_error() -> None:
    registry = Registry("thing", contract="builder() -> thing")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(lambda: 2)


def test_unknown_name_lists_known_names() -> None:
    registry = Registry("thing", contract="builder() -> thing")
    registry.register("alpha")(lambda: 1)
    registry.register("beta")(lambda: 2)
    with pytest.raises(ConfigError, match="unknown thing 'gamma'; known things: alpha, beta"):
        registry.get("gamma")


def test_build_drops_none_kwargs() -> None:
    registry = Registry("thing", contract="builder(x=1) -> x")
    registry.register("f")(lambda x=1: x)
    assert registry.build("f", x=None) == 1
    assert registry.build("f", x=5) == 5


@pytest.mark.parametrize(("registry", "group"), [(MODELS, "model"), (CONVS, "conv"), (DATASETS, "dataset")])
def test_registry_names_equal_config_options(registry: Registry, group: str) -> None:
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options == sorted(registry)


def test_device_options_mirror_config() -> None:
    assert sorted(p.stem for p in (CONF_DIR / "device").glob("*.yaml")) == sorted(DEVICE_CHOICES)


def test_every_model_task_exists_and_some_dataset_serves_it() -> None:
    for name in MODELS:
        task = MODELS.meta(name)["task"]
        assert task in TASKS
        assert any(task in DATASETS.meta(d)["tasks"] for d in DATASETS)
