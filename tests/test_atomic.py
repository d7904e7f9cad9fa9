"""One atomic-write helper: a crash or a full disk while writing leaves the previous file intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dcn_experiments.atomic import atomic_write, atomic_write_text
from dcn_experiments.engine import load_checkpoint, save_checkpoint


def test_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "record.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    atomic_write_text(target, "good")
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as handle:
        handle.write("half a fi")
        raise KeyboardInterrupt  # killed mid-write
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(target, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
