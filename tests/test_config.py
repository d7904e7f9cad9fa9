"""Every config group option composes, and experiments set what they promise."""

from __future__ import annotations

import pytest

from .conftest import CONF_DIR, assert_one_line_error


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "conv", "dataset", "device", "experiment"])
def test_every_option_composes(compose_cfg, group: str) -> None:
    for option in _options(group):
        cfg = compose_cfg(f"{group}={option}")
        assert cfg.seed == 0
        for key in ("model", "conv", "dataset", "device", "trainer"):
            assert key in cfg


def test_defaults(compose_cfg) -> None:
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.conv.name, cfg.dataset.name, cfg.device.name) == (
        "resnet34",
        "regular",
        "shapes",
        "auto",
    )
    assert cfg.model.stem == "cifar"
    assert cfg.conv.offset_lr_mult == 0.1


def test_user_keys_from_spec_are_overridable(compose_cfg) -> None:
    cfg = compose_cfg(
        "seed=3",
        "trainer.epochs=2",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=0.5",
        "trainer.lr=0.01",
        "trainer.optimizer=sgd",
        "dataset.root=/x",
        "dataset.batch_size=8",
        "dataset.num_workers=1",
        "dataset=cifar10",
        "dataset.download=true",
        "conv=deformable",
        "conv.placement=all",
        "conv.version=1",
    )
    assert cfg.seed == 3 and cfg.trainer.limit_val_batches == 0.5 and cfg.dataset.download is True
    assert cfg.conv.placement == "all" and cfg.conv.version == 1


def test_both_conv_options_accept_the_same_keys(compose_cfg) -> None:
    """A sweep `conv=regular,deformable conv.placement=all` must compose for both arms."""
    regular, deformable = compose_cfg("conv=regular"), compose_cfg("conv=deformable")
    assert set(regular.conv) == set(deformable.conv)


def test_seed_cifar10_is_the_notebook_setting(compose_cfg) -> None:
    cfg = compose_cfg("experiment=seed_cifar10")
    assert cfg.dataset.name == "cifar10" and cfg.dataset.batch_size == 64
    assert cfg.dataset.augment is False and cfg.dataset.normalize is False
    assert (cfg.trainer.optimizer, cfg.trainer.lr, cfg.trainer.epochs) == ("adam", 0.001, 10)
    assert cfg.model.stem == "imagenet"


def test_seed_coco_uses_unet_on_coco(compose_cfg) -> None:
    cfg = compose_cfg("experiment=seed_coco")
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.epochs) == ("unet", "coco", 10)


def test_smoke_is_small(compose_cfg) -> None:
    cfg = compose_cfg("experiment=smoke")
    assert cfg.trainer.limit_train_batches <= 5 and cfg.dataset.train_size <= 256
    assert compose_cfg("experiment=smoke_seg").model.name == "unet"


def test_cuda_kernel_defaults_to_auto_and_can_be_chosen(compose_cfg) -> None:
    assert compose_cfg("conv=deformable").conv.cuda_kernel == "auto"
    assert compose_cfg("conv=deformable", "conv.cuda_kernel=triton").conv.cuda_kernel == "triton"


def test_unknown_cuda_kernel_is_one_line_error(run_cli, tmp_path) -> None:
    result = run_cli("experiment=smoke", "conv=deformable", "conv.cuda_kernel=cudnn", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(result, "conv.cuda_kernel='cudnn'", "auto, torchvision, triton")
    assert result.returncode == 2
