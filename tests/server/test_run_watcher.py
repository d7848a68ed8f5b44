"""server/run_watcher.py: audit entries for completed rounds and failed sites from metrics.csv."""
from __future__ import annotations

from pathlib import Path

from launch.audit import AuditLog
from server.run_watcher import RunFolderWatcher


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


def test_watcher_skips_a_malformed_row_instead_of_stopping_the_coordinator(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("round,phase,site,metric,value\n,train,all-sites,x,1\n"
                                     "one,train,a,x,1\n1,train,a,x,1\n")
    watcher = RunFolderWatcher(run, AuditLog(tmp_path / "audit.jsonl"), run_id=1)
    assert [e["round"] for e in watcher.poll()] == [1]


def test_watcher_follows_the_server_writer_round_after_round(tmp_path: Path) -> None:
    """The ServerApp's csv rows end in \\r\\n: read as text, each poll undercounted its offset by a
    byte a row and the next poll began mid-row (the empty-round crash seen under client DP). Here
    17 rows (the header and 16 of 18 bytes) would restart the next read at the "2" of "12,..." and invent a round 2."""
    from server.state import MetricRow, ServerRunFolder

    folder = ServerRunFolder(tmp_path / "run")
    watcher = RunFolderWatcher(folder.path, AuditLog(tmp_path / "audit.jsonl"), run_id=1)
    folder.append_metrics([MetricRow(12, "train", "a", "x", 0.5)] * 16)  # + the header: 17 rows
    assert (folder.path / "metrics.csv").read_bytes().endswith(b"12,train,a,x,0.5\r\n")
    assert [e["round"] for e in watcher.poll()] == [12]
    for rnd in (13, 14):
        folder.append_metrics([MetricRow(rnd, "train", "busi", "train_loss", 0.25)])
        assert [e["round"] for e in watcher.poll()] == [rnd]
    folder.truncate_metrics(after_round=13)  # a resume rewrites the file (a new inode) ...
    folder.append_metrics([MetricRow(r, "train", "busi", "train_loss", 0.1) for r in (14, 15)] * 20)
    assert [e["round"] for e in watcher.poll()] == [15]  # ... longer than where the reader was
