"""Atomic writes: the target is complete or untouched, no temporary file is left behind, the
data and the rename are fsynced, and the file's permissions are chosen."""
import os
import stat
from pathlib import Path

import pytest

import common.atomic as atomic_module
from common.atomic import atomic_write


def test_writes_text_and_binary_and_creates_parents(tmp_path: Path) -> None:
    text = atomic_write(tmp_path / "a" / "b.json", lambda fh: fh.write("{}"))
    blob = atomic_write(tmp_path / "c.bin", lambda fh: fh.write(b"\x00\x01"), binary=True)
    assert text.read_text() == "{}" and blob.read_bytes() == b"\x00\x01"


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_fail(fh) -> None:
        fh.write("new but incomp")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_fsyncs_the_file_and_then_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "x.txt", lambda fh: fh.write("x"))
    assert synced == ["file", "dir"]  # data before the rename, the rename after it


def test_private_by_default_shared_on_request(tmp_path: Path) -> None:
    private = atomic_write(tmp_path / "cache.pt", lambda fh: fh.write(b"x"), binary=True)
    assert private.stat().st_mode & 0o777 == 0o600
    mask = os.umask(0o027)
    try:
        atomic_module._UMASK.clear()  # read again under this test's umask
        shared = atomic_write(tmp_path / "results.csv", lambda fh: fh.write("a\r\nb\n"), mode=None)
    finally:
        os.umask(mask)
        atomic_module._UMASK.clear()
    assert shared.stat().st_mode & 0o777 == 0o640
    assert shared.read_bytes() == b"a\r\nb\n"  # text is written as given
