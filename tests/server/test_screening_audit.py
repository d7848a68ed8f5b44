"""Rejected updates and dropped sites are entries of the coordinator's anchored audit log
(server/screening.py ``audit_screening``, called by the round loop in server/app.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.sitedata import clear_memo
from launch.audit import read, verify
from server.app import run_federation
from server.identity import IdentityCheck, write_site_registry
from server.screening import audit_screening
from tests.server.local_grid import task_identity, tiny_spec
from tests.server.test_screening import HOSTILE_NODE, grid_for


def test_each_rejection_and_drop_is_one_entry_with_site_round_and_reason(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    entries = audit_screening(log, 4, {"C": "non-finite values in 2 array(s)", "A": "num-examples 9 exceeds"},
                              {"C"}, 3, run_dir="/runs/x")
    assert [(e["event"], e["site"], e["round"]) for e in entries] == [
        ("update_rejected", "A", 4), ("update_rejected", "C", 4), ("site_dropped", "C", 4)]
    on_disk = read(log)
    assert [e["reason"] for e in on_disk] == ["num-examples 9 exceeds", "non-finite values in 2 array(s)",
                                              "update rejected 3 round(s) running; no longer sampled in this run"]
    assert {e["actor"] for e in on_disk} == {"serverapp"} and {e["run_dir"] for e in on_disk} == {"/runs/x"}
    assert verify(log) == []  # chained, keyed and anchored like every other entry


def test_no_log_or_nothing_to_say_writes_nothing(tmp_path: Path) -> None:
    assert audit_screening(None, 1, {"C": "x"}, {"C"}, 3) == []
    assert audit_screening(tmp_path / "audit.jsonl", 1, {}, set(), 3) == []
    assert not (tmp_path / "audit.jsonl").exists()


def test_an_unwritable_log_does_not_stop_the_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    assert audit_screening(blocker / "audit.jsonl", 2, {"C": "x"}, set(), 3) == []
    assert "could not audit the screening outcome" in caplog.text


def test_the_round_loop_audits_a_hostile_site_by_name_until_it_is_dropped(tmp_path: Path) -> None:
    clear_memo()
    spec = tiny_spec(tmp_path / "run", rounds=3, drop_after_rejections=2)
    log = tmp_path / "coordinator" / "audit.jsonl"
    write_site_registry(spec.run_dir, {1000: "A", 1001: "B", HOSTILE_NODE: "C"}, log)  # as flower-server does
    identity = IdentityCheck.from_run_dir(spec.run_dir)
    with task_identity():
        folder = run_federation(grid_for(spec, "nan"), spec, identity=identity)
    assert folder.read_status()["state"] == "finished"
    entries = read(log)
    assert [(e["event"], e["site"], e["round"]) for e in entries] == [
        ("update_rejected", "C", 1), ("update_rejected", "C", 2), ("site_dropped", "C", 2)]
    assert all(e["reason"].startswith("non-finite values in") for e in entries[:2])
    assert "2 round(s) running" in entries[2]["reason"]
    assert {e["run_dir"] for e in entries} == {spec.run_dir}
    assert verify(log) == []
