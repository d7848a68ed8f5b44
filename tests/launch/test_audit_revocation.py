"""Revocations are audit entries: fedbus-pki revoke (launch/pki.py) and server/control.py unregister_node."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import server.control as control
from launch.audit import read, verify


def _pki() -> Any:
    import launch.pki

    return launch.pki


def test_pki_revoke_logs_each_node_in_the_coordinators_audit_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = _pki()
    nodes = [{"node-id": 11, "name": "busi", "status": "online"},
             {"node-id": 12, "name": "busi", "status": "unregistered"},
             {"node-id": 13, "name": "udiat", "status": "online"},
             {"node-id": 14, "name": "busi", "status": "registered"}]
    calls: list[list[str]] = []
    monkeypatch.setattr(pki, "list_sites", lambda home, conn: nodes)
    monkeypatch.setattr(pki, "_flwr", lambda args, home: calls.append(args)
                        or subprocess.CompletedProcess(args, 0, "", ""))
    home = tmp_path / "state" / "flwr-home"
    assert pki.revoke("busi", home) == [11, 14]
    assert [c[2] for c in calls] == ["11", "14"]
    entries = read(tmp_path / "state" / "audit.jsonl")  # beside the Flower home by default
    assert [(e["event"], e["site"], e["node_id"]) for e in entries] == [
        ("site_revoked", "busi", 11), ("site_revoked", "busi", 14)]
    assert verify(tmp_path / "state" / "audit.jsonl") == []


def test_pki_revoke_failure_logs_only_what_was_revoked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = _pki()
    monkeypatch.setattr(pki, "list_sites", lambda home, conn: [
        {"node-id": 1, "name": "busi", "status": "online"}, {"node-id": 2, "name": "busi", "status": "online"}])
    monkeypatch.setattr(pki, "_flwr", lambda args, home: subprocess.CompletedProcess(
        args, 0 if args[2] == "1" else 1, "", "boom"))
    log = tmp_path / "elsewhere.jsonl"
    with pytest.raises(RuntimeError, match="unregistering busi"):
        pki.revoke("busi", tmp_path / "home", audit_log=log)
    assert [e["node_id"] for e in read(log)] == [1]


def test_control_unregister_node_is_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.audit import AuditLog

    seen: list[list[str]] = []
    monkeypatch.setattr(control, "flwr_cli", lambda args, home: seen.append(args) or "")
    audit = AuditLog(tmp_path / "audit.jsonl")
    control.unregister_node(7, tmp_path, audit=audit, site="udiat")
    assert seen == [["supernode", "unregister", "7", control.CONNECTION]]
    assert [(e["event"], e["site"], e["node_id"]) for e in read(tmp_path / "audit.jsonl")] == [
        ("site_revoked", "udiat", 7)]


def test_a_revocation_records_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = _pki()
    monkeypatch.setattr(pki, "list_sites", lambda home, conn: [{"node-id": 5, "name": "udiat", "status": "online"}])
    monkeypatch.setattr(pki, "_flwr", lambda args, home: subprocess.CompletedProcess(args, 0, "", ""))
    log = tmp_path / "audit.jsonl"
    assert pki.main(["revoke", "udiat", "--flwr-home", str(tmp_path / "home"), "--audit-log", str(log),
                     "--reason", "key lost"]) == 0
    monkeypatch.setattr(control, "flwr_cli", lambda args, home: "")
    from launch.audit import AuditLog

    control.unregister_node(6, tmp_path, audit=AuditLog(log), site="udiat")
    assert [(e["site"], e["node_id"], e["reason"]) for e in read(log)] == [
        ("udiat", 5, "key lost"), ("udiat", 6, "operator request")]
    assert verify(log) == []
