"""Shared fixtures: composing real configs and running the real CLI into tmp_path."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

# The suite runs in two xdist workers on two cores. OpenMP's default wait policy spins while a thread
# waits for work, which burns the core the other worker's process needs: the crash matrix took 46 s
# alone, 125 s next to one busy process, and 70 s there with PASSIVE (52 s alone). Set before torch is
# imported, so that this process and every CLI run the tests start (they copy os.environ) sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
SCRIPTS = REPO / "scripts"
SHARED_DATA = REPO.parent / "shared" / "data"
# Shrinks any run to seconds without experiment=smoke (whose keys are shapes-specific).
FAST = (
    "trainer.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "model.width=8",
    "dataset.batch_size=4",
    "trainer.progress=false",
)
# One training step and one validation batch per job: for sweeps whose checks are about the files and
# records a sweep writes, not about how far the model trains.
ONE_STEP = ("trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides, as Hydra would for the CLI."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)

    yield _compose
    GlobalHydra.instance().clear()


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>`` with ``args`` in a subprocess, output captured as text."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout)


def import_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture
def python_op_kernels() -> Iterator[None]:
    """Serve the op's CPU calls from its Python kernels, as before the C++ library is loaded, so that a
    test reaches the Python paths (and, with the library marked unloaded, the reference fallback) in
    a process where the library's own CPU kernels would otherwise take them."""
    import torch

    from dcn_experiments.ops import cpu_extension_available

    if not cpu_extension_available():
        yield
        return
    previous = torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(False)
    try:
        yield
    finally:
        torch.ops.dcn_experiments_cpu.set_public_cpu_kernels(previous)


@pytest.fixture(scope="session")
def shared_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the whole session, so rendered shapes are reused across CLI tests."""
    return tmp_path_factory.mktemp("data")


def cli(
    *args: str,
    cwd: Path,
    data_root: Path,
    module: str = "dcn_experiments.train",
    timeout: int = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` in ``cwd`` with the rendered datasets under ``data_root``."""
    env = {**os.environ, "DCN_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def run_cli(shared_data_root: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m dcn_experiments.train ARGS`` (or another module) in ``tmp_path``."""

    def _run(
        *args: str, module: str = "dcn_experiments.train", timeout: int = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return cli(*args, cwd=tmp_path, data_root=shared_data_root, module=module, timeout=timeout, env=env)

    return _run


# Finished runs that several test files read: each is one CLI training run, made once per session
# (per xdist worker). Tests must not write into them: copy the folder first, or resume into a new one.
Finished = tuple[Path, subprocess.CompletedProcess]


def _finish(factory: pytest.TempPathFactory, data_root: Path, *overrides: str) -> Finished:
    run_dir = factory.mktemp("finished") / "run"
    result = cli(*overrides, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, shared_data_root: Path) -> Finished:
    """``dcn-train experiment=smoke conv=deformable``: its folder and the finished process."""
    return _finish(tmp_path_factory, shared_data_root, "experiment=smoke", "conv=deformable")


@pytest.fixture(scope="session")
def smoke_seg_run(tmp_path_factory: pytest.TempPathFactory, shared_data_root: Path) -> Finished:
    """``dcn-train experiment=smoke_seg conv=deformable`` (U-Net): its folder and the finished process."""
    return _finish(tmp_path_factory, shared_data_root, "experiment=smoke_seg", "conv=deformable")


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, no traceback, one ``error:`` line mentioning each fragment."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
