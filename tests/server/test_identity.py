"""Site identity bound to its key (server/identity.py, server/app.py query round): a node whose
claimed site name is not the name its key was registered under is refused by name; the honest
sites run; without a registry (simulation) nothing is checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, MessageType, RecordDict

from client.app import make_client_app
from common.federation import AGGREGATE_SITE, RunSpec
from launch import audit
from server.app import make_server_app, run_federation
from server.control import NodeRow
from server.coordinator import Coordinator
from server.coordinator_config import CoordinatorConfig, TLSFiles
from server.identity import REGISTRY_FILE, IdentityCheck, write_site_registry
from server.state import ServerRunFolder
from tests.server.local_grid import LocalGrid, tiny_spec

IMPOSTOR = 999  # registered as "C", its site configuration says "B"


def impostor_grid(spec: RunSpec) -> LocalGrid:
    """The impostor is listed (and queried) first: without the check it would take "B" and the
    real B node (1001) would be refused as a second claimant."""
    n = len(spec.sites)
    configs = {IMPOSTOR: {"partition-id": 1, "num-partitions": n},
               1000: {"partition-id": 0, "num-partitions": n},
               1001: {"partition-id": 1, "num-partitions": n}}
    return LocalGrid(make_client_app(spec), configs)


def _nodes_sent(grid: LocalGrid, kind: str) -> set[int]:
    return {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == kind}


def test_a_node_claiming_another_sites_name_is_refused_and_the_honest_sites_run(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    log_path = tmp_path / "state" / "audit.jsonl"
    write_site_registry(spec.run_dir, {IMPOSTOR: "C", 1000: "A", 1001: "B"}, log_path)
    identity = IdentityCheck.from_run_dir(spec.run_dir)
    assert identity is not None
    grid = impostor_grid(spec)
    folder = run_federation(grid, spec, identity=identity)
    assert _nodes_sent(grid, MessageType.TRAIN) == {1000, 1001}  # the real B trained, not the impostor
    assert _nodes_sent(grid, MessageType.QUERY) == {IMPOSTOR, 1000, 1001}
    rows = folder.read_metrics()
    assert [(r.phase, r.site, r.metric) for r in rows if r.metric == "identity_refused"] == [("join", "C", "identity_refused")]
    assert {r.site for r in rows if r.phase == "train" and r.metric == "num-examples"} == {"A", "B", AGGREGATE_SITE}
    entries = [e for e in audit.read(log_path) if e["event"] == "site_identity_refused"]
    assert [(e["node_id"], e["claimed"], e["registered"]) for e in entries] == [(IMPOSTOR, "B", "C")]
    assert audit.verify(log_path) == []


def test_a_node_without_a_registered_key_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    write_site_registry(spec.run_dir, {1000: "A", 1001: "B"}, None)  # no audit log at hand: log + metrics only
    grid = impostor_grid(spec)
    with caplog.at_level("ERROR"):
        folder = run_federation(grid, spec, identity=IdentityCheck.from_run_dir(spec.run_dir))
    assert _nodes_sent(grid, MessageType.TRAIN) == {1000, 1001}
    assert "node 999 claims site 'B' but has no registered key: refused" in caplog.text
    assert [(r.site, r.metric) for r in folder.read_metrics() if r.phase == "join"] == [("node-999", "identity_refused")]


def test_a_key_registered_during_the_run_is_read_from_the_rewritten_registry(tmp_path: Path) -> None:
    path = write_site_registry(tmp_path, {1000: "A"}, None)
    check = IdentityCheck(path)
    write_site_registry(tmp_path, {1000: "A", 2**63 + 5: "B"}, None)  # 64-bit ids survive JSON
    assert check.check(2**63 + 5, "B") is None
    refusal = check.check(1000, "B")
    assert refusal is not None and refusal.reason == "node 1000 claims site 'B' but its key is registered as 'A'"
    assert json.loads(path.read_text())["nodes"] == {"1000": "A", str(2**63 + 5): "B"}


def test_simulation_is_not_checked_even_with_a_registry_in_the_run_folder(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    write_site_registry(spec.run_dir, {1: "A"}, None)  # would refuse every simulated node
    grid = impostor_grid(spec)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(spec)(grid, context)
    assert _nodes_sent(grid, MessageType.TRAIN) == {IMPOSTOR, 1000}  # unchecked: the impostor took "B"
    assert ServerRunFolder(spec.run_dir).read_status()["state"] == "finished"
    assert IdentityCheck.from_run_dir(tmp_path / "elsewhere") is None


class FakeControl:
    def __init__(self, rows: list[NodeRow]) -> None:
        self.rows = rows

    def nodes(self) -> list[NodeRow]:
        return self.rows


def _row(node_id: int, name: str, status: str = "online") -> NodeRow:
    return NodeRow(node_id, name, status, "00", "", "")


def test_coordinator_publishes_the_superlinks_registry_and_removes_it_when_insecure(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "run")
    cfg = CoordinatorConfig(state_dir=str(tmp_path / "state"), audit_log=str(tmp_path / "state" / "audit.jsonl"),
                            tls=TLSFiles(ca_cert="ca.crt", server_cert="server.pem", server_key="server.key"))
    coordinator = Coordinator(cfg, spec, tmp_path / "spec.yaml", echo=False)
    coordinator.control = FakeControl([_row(7, "udiat"), _row(8, "busi", "registered"), _row(9, "old", "unregistered")])  # type: ignore[assignment]
    coordinator.publish_registry()
    doc = json.loads((Path(spec.run_dir) / REGISTRY_FILE).read_text())
    assert doc == {"nodes": {"7": "udiat", "8": "busi"}, "audit_log": str((tmp_path / "state" / "audit.jsonl").resolve())}
    insecure = Coordinator(CoordinatorConfig(state_dir=str(tmp_path / "state"), insecure=True), spec,
                           tmp_path / "spec.yaml", echo=False)
    insecure.control = coordinator.control
    insecure.publish_registry()
    assert not (Path(spec.run_dir) / REGISTRY_FILE).exists()
