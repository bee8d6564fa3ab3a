"""Tests for alignfl_mpi.fileio: atomic file and folder writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from alignfl_mpi.fileio import atomic_dir, atomic_path, current_umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_path_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        tmp.write_bytes(b"one")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_atomic_path_keeps_the_old_file_and_removes_the_temporary_on_error(
        tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_mode_is_masked_by_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        with atomic_path(tmp_path / "shared") as tmp:
            tmp.write_text("x")
        with atomic_path(tmp_path / "private", mode=0o600) as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "shared") == 0o640
    assert _mode(tmp_path / "private") == 0o600


def test_atomic_dir_replaces_a_folder_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "data"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert _mode(target) == 0o777 & ~current_umask()
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError("bad file")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
