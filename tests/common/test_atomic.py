"""Atomic writes: the target is complete or untouched, and no temporary file is left behind."""
from pathlib import Path

import pytest

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
