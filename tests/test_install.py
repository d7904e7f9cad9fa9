"""Installs that work anywhere: a wheel ships conf/ and runs from any folder; the kernel cache is
keyed by the CPU, safe under concurrent builds, and heals a corrupt or half-built cache."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dcn_experiments.ops.deform_conv import cpu_signature

from .conftest import ONE_STEP

REPO = Path(__file__).resolve().parent.parent
CONF_FILES = sorted(
    str(p.relative_to(REPO / "dcn_experiments")) for p in (REPO / "dcn_experiments" / "conf").rglob("*.yaml")
)
USE_KERNEL = """
import torch, warnings
warnings.simplefilter("error")  # the fallback warning fails the process
from dcn_experiments.ops import cpu_extension_available, deform_conv2d, deform_conv2d_reference
assert cpu_extension_available()
x, off, w = torch.randn(2, 4, 6, 6), torch.randn(2, 18, 6, 6), torch.randn(5, 4, 3, 3)
torch.testing.assert_close(deform_conv2d(x, off, w, padding=1), deform_conv2d_reference(x, off, w, padding=1))
print("kernel ok")
"""


def test_the_wheel_ships_conf_and_runs_outside_the_repository(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("dcn_experiments-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"dcn_experiments/{f}" for f in CONF_FILES} <= names
    assert "dcn_experiments/conf/train.yaml" in names
    assert {"dcn_experiments/ops/deform_conv2d_cpu.cpp", "dcn_experiments/ops/deform_conv2d_op.cpp"} <= names

    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DCN_DATA_ROOT": str(tmp_path / "data")}
    where = subprocess.run(
        [sys.executable, "-c", "import dcn_experiments; print(dcn_experiments.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the wheel's copy, not the checkout
    run = subprocess.run(
        [sys.executable, "-m", "dcn_experiments.train", "experiment=smoke", *ONE_STEP, "hydra.run.dir=run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert (elsewhere / "run" / "metrics.json").is_file()
    report = subprocess.run(
        [sys.executable, "-m", "dcn_experiments.report.cli", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr


def test_the_kernel_cache_key_follows_the_cpu() -> None:
    avx2 = "processor : 0\nmodel name : Some CPU\nflags : fpu sse2 avx2\n"
    avx512 = "processor : 0\nmodel name : Some CPU\nflags : fpu sse2 avx2 avx512f\n"
    assert cpu_signature(avx2) == cpu_signature(avx2)
    assert cpu_signature(avx2) != cpu_signature(avx512)
    assert cpu_signature(avx2) != cpu_signature(avx2.replace("Some CPU", "Other CPU"))


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, str, str]]]:
    """Two processes that start at once on an empty kernel cache: the cache folder and each one's
    (exit code, stdout, stderr). One compile (~15 s) that both tests below start from."""
    kernel = tmp_path_factory.mktemp("kernel") / "cache"
    env = {**os.environ, "DCN_EXTENSION_DIR": str(kernel)}
    builds = [
        subprocess.Popen(
            [sys.executable, "-c", USE_KERNEL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [build.communicate(timeout=600) for build in builds]
    return kernel, [(build.returncode, out, err) for build, (out, err) in zip(builds, outputs, strict=True)]


def test_two_processes_building_the_kernel_at_once_both_get_it(two_builds) -> None:
    for returncode, out, err in two_builds[1]:
        assert returncode == 0 and "kernel ok" in out, err


def test_a_corrupt_binary_or_a_stale_build_lock_is_rebuilt(two_builds) -> None:
    kernel, builds = two_builds  # a cache holding a finished build, which this test damages
    assert all(returncode == 0 for returncode, _, _ in builds), builds
    env = {**os.environ, "DCN_EXTENSION_DIR": str(kernel)}
    (binary,) = kernel.glob("*.so")
    binary.write_bytes(binary.read_bytes()[:1000])  # a truncated copy, as a full disk leaves it
    (kernel / "lock").touch()  # and the lock file of a build that was killed
    again = subprocess.run([sys.executable, "-c", USE_KERNEL], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "kernel ok" in again.stdout, again.stderr
