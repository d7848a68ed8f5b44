"""launch/audit.py: the hash chain, HMACs and anchor, tamper and truncation detection, resumed
appends, several writers on one file, the verify command."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from launch.audit import GENESIS, AuditLog, anchor_path, key_path, main, read, verify


def test_chain_links_each_entry_to_the_previous_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    first = log.append("run_submitted", run_id=7, fab_sha256="ab" * 32)
    second = log.append("round_completed", run_id=7, round=1)
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert second["seq"] == 2 and second["prev"] != GENESIS
    assert verify(tmp_path / "audit.jsonl") == []
    assert [e["event"] for e in read(tmp_path / "audit.jsonl")] == ["run_submitted", "round_completed"]


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    AuditLog(tmp_path / "a.jsonl").append("coordinator_start")
    entry = AuditLog(tmp_path / "a.jsonl").append("coordinator_stop")
    assert entry["seq"] == 2
    assert verify(tmp_path / "a.jsonl") == []


def test_editing_or_deleting_a_past_entry_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for r in range(1, 4):
        log.append("round_completed", round=r)
    lines = path.read_text().splitlines(keepends=True)
    edited = json.loads(lines[1])
    edited["round"] = 99
    path.write_text(lines[0] + json.dumps(edited) + "\n" + lines[2])
    assert any("chain broken" in p for p in verify(path))
    path.write_text(lines[0] + lines[2])  # entry 2 deleted
    problems = verify(path)
    assert any("chain broken" in p for p in problems) and any("sequence 3 after 1" in p for p in problems)


def _log_of(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for r in range(1, n + 1):
        log.append("round_completed", round=r)
    return path


def test_key_is_private_and_anchor_records_count_and_head(tmp_path: Path) -> None:
    path = _log_of(tmp_path, 3)
    assert key_path(path).stat().st_mode & 0o777 == 0o600
    anchor = json.loads(anchor_path(path).read_text())
    assert anchor["entries"] == 3
    assert anchor["head"] == hashlib.sha256(path.read_text().splitlines()[-1].encode()).hexdigest()


def test_deleting_the_last_lines_is_detected_as_truncation(tmp_path: Path) -> None:
    path = _log_of(tmp_path, 5)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))
    assert verify(path) == [f"{path}: truncated: 3 entries, anchor says 5"]
    path.write_text("")
    assert verify(path) == [f"{path}: truncated: 0 entries, anchor says 5"]


def test_missing_anchor_fails(tmp_path: Path) -> None:
    path = _log_of(tmp_path, 2)
    anchor_path(path).unlink()
    assert verify(path) == [f"{anchor_path(path)}: anchor missing (truncation cannot be ruled out)"]


def test_an_edit_rehashed_into_the_chain_still_fails_its_hmac(tmp_path: Path) -> None:
    """Someone who can write the log but not read the key: edits line 2 and recomputes every
    ``prev``, so the chain holds; the HMACs of lines 2 and 3 give it away."""
    path = _log_of(tmp_path, 3)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[1]["round"] = 99
    prev, out = GENESIS, []
    for e in entries:
        e["prev"] = prev
        line = json.dumps(e)
        out.append(line + "\n")
        prev = hashlib.sha256(line.encode()).hexdigest()
    path.write_text("".join(out))
    problems = verify(path)
    assert problems[:2] == [f"{path}:2: HMAC mismatch (entry edited)",
                            f"{path}:3: HMAC mismatch (entry edited)"]
    assert not any("chain broken" in p for p in problems)


def test_one_entry_ahead_of_the_anchor_is_accepted_two_are_not(tmp_path: Path) -> None:
    path = _log_of(tmp_path, 3)
    saved = anchor_path(path).read_text()
    AuditLog(path).append("extra")
    anchor_path(path).write_text(saved)  # as if the process died between line and anchor
    assert verify(path) == []
    AuditLog(path).append("extra2")
    anchor_path(path).write_text(saved)
    assert verify(path) == [f"{path}: 5 entries but the anchor says 3 (anchor not updated)"]


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    """A site's launcher and its worker hold separate AuditLog objects on the same file."""
    path = tmp_path / "audit.jsonl"
    launcher, worker = AuditLog(path, actor="site:a"), AuditLog(path, actor="site:a")
    launcher.append("site_start")
    worker.append("task")
    worker.append("task")
    entry = launcher.append("site_stop")
    assert entry["seq"] == 4
    assert verify(path) == []


def test_verify_command_prints_ok_or_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _log_of(tmp_path, 4)
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "audit log OK (4 entries)"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert main(["verify", str(path)]) == 1
    assert "truncated: 2 entries, anchor says 4" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope.jsonl")]) == 2
