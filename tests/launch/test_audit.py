"""launch/audit.py: the hash chain, tamper detection, resumed appends."""
from __future__ import annotations

import json
from pathlib import Path

from launch.audit import GENESIS, AuditLog, read, verify


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
