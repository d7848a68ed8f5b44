"""server/audit.py: the hash chain, tamper detection, resumed appends and the run-folder watcher."""
from __future__ import annotations

import json
from pathlib import Path

from server.audit import GENESIS, AuditLog, RunFolderWatcher, read, verify


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


def test_watcher_reports_rounds_and_failed_sites_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    csv = run / "metrics.csv"
    csv.write_text("round,phase,site,metric,value\n"
                   "1,train,busi,train_loss,0.5\n1,train,udiat,failed,1.0\n"
                   "1,train,all-sites,sites_ok,1.0\n1,evaluate,busi,dice,0.4\n")
    audit = AuditLog(tmp_path / "audit.jsonl")
    watcher = RunFolderWatcher(run, audit, run_id=5)
    entries = watcher.poll()
    assert [e["event"] for e in entries] == ["site_failure", "round_completed"]
    assert entries[0]["site"] == "udiat" and entries[0]["phase"] == "train"
    assert entries[1]["round"] == 1 and entries[1]["sites"] == ["busi"] and entries[1]["failed"] == ["udiat"]
    assert watcher.poll() == []  # nothing new
    with csv.open("a") as fh:
        fh.write("2,train,busi,train_loss,0.4\n2,train,udiat,train_l")  # torn last line
    entries = watcher.poll()
    assert [(e["event"], e["round"]) for e in entries] == [("round_completed", 2)]
    assert watcher.last_round == 2


def test_watcher_survives_a_rewritten_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    csv = run / "metrics.csv"
    csv.write_text("round,phase,site,metric,value\n1,train,a,x,1\n2,train,a,x,1\n")
    watcher = RunFolderWatcher(run, AuditLog(tmp_path / "audit.jsonl"), run_id=1)
    assert [e["round"] for e in watcher.poll()] == [1, 2]
    csv.write_text("round,phase,site,metric,value\n1,train,a,x,1\n")  # resume truncated round 2
    assert watcher.poll() == []
    with csv.open("a") as fh:
        fh.write("2,train,a,x,2\n3,train,a,x,2\n")
    assert [e["round"] for e in watcher.poll()] == [3]


def test_watcher_skips_rounds_of_the_run_it_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("round,phase,site,metric,value\n1,train,a,x,1\n2,train,a,x,1\n")
    watcher = RunFolderWatcher(run, AuditLog(tmp_path / "audit.jsonl"), run_id=2, after_round=1)
    assert [e["round"] for e in watcher.poll()] == [2]
