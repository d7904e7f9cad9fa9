"""Where a run ran: the facts that decide whether two runs' timings can be compared."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def git_commit() -> str | None:
    """The commit of the project's source tree when it runs from a git checkout (else None)."""
    source = Path(__file__).resolve().parent.parent.parent
    if not (source / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(
    device: torch.device, concurrent_jobs: int = 1, world_size: int = 1, dist_backend: str | None = None
) -> dict[str, Any]:
    """The ``environment`` block of a run record: host, CPU, threads (per process), GPU, versions,
    commit, how many jobs shared the machine (their time ratios are then not comparable with solo
    runs) and the DDP world (``world_size`` processes over ``dist_backend``)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dcn_experiments": _version("dcn-experiments"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "concurrent_jobs": concurrent_jobs,
        "world_size": world_size,
        "dist_backend": dist_backend,
    }
