"""Update screening on the server (server/screening.py, server/strategy.py, the round loop):
three tiny synthetic sites on the in-process grid, one of them (or all) running a hostile
ClientApp that replaces its train reply."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import make_client_app
from common.federation import FederationConfig, RunSpec
from common.fedmetrics import train_metrics
from common.packing import PACKED_KEY
from common.sitedata import clear_memo
from server.app import FederationFailed, run_federation
from server.registry import SiteRegistry
from server.screening import aggregate_problem
from server.state import ServerRunFolder
from server.strategies import build_strategy
from tests.server.local_grid import LocalGrid, task_identity, tiny_spec
from tests.server.test_strategy import NODES, _configure, _reply, _train_metrics

HOSTILE_NODE = 1002  # partition 2: site C


def poisoned_reply(msg: Message, kind: str) -> Message:
    """What a modified ClientApp sends instead of training: (a) NaN weights, (b) weights of 1e30,
    (c) the global weights plus noise ×10, claiming 1e9 examples."""
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    flat = sent[PACKED_KEY].copy()
    count = 1
    if kind == "nan":
        flat[::7] = np.nan
    elif kind == "huge":
        flat[:] = 1e30
    elif kind == "noise":
        flat += (10 * np.random.default_rng(0).normal(size=flat.shape)).astype(np.float32)
        count = 10**9
    else:
        raise ValueError(kind)
    arrays = ArrayRecord({**{k: Array(v) for k, v in sent.items() if k != PACKED_KEY}, PACKED_KEY: Array(flat)})
    metrics = MetricRecord(train_metrics(count, 1.0, {}, steps=2, seconds=0.1))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class HostileApp:
    """The real ClientApp, except for the train replies of ``nodes`` from round ``from_round``."""

    def __init__(self, app: ClientApp, kind: str, nodes: set[int], from_round: int = 1) -> None:
        self.app, self.kind, self.nodes, self.from_round = app, kind, nodes, from_round

    def __call__(self, msg: Message, context: Context) -> Message:
        if (msg.metadata.message_type == MessageType.TRAIN and context.node_id in self.nodes
                and int(msg.content["config"]["server-round"]) >= self.from_round):
            return poisoned_reply(msg, self.kind)
        return self.app(msg, context)


def grid_for(spec: RunSpec, kind: str | None = None, nodes: set[int] = frozenset({HOSTILE_NODE}),
             from_round: int = 1) -> LocalGrid:
    """Nodes as in simulation (node_config: partition id); ``kind`` None: all honest."""
    app = make_client_app(spec)
    n = len(spec.sites)
    grid = LocalGrid(app, {1000 + i: {"partition-id": i, "num-partitions": n} for i in range(n)})
    if kind is not None:
        grid.app = HostileApp(app, kind, set(nodes), from_round)  # type: ignore[assignment]
    return grid


def _weights(run_dir: Path | str) -> dict[str, torch.Tensor]:
    return ServerRunFolder(run_dir).load(restore=False).state_dict


@pytest.fixture(scope="module")
def honest_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same 3-round run with site C simply absent (its node offline): the honest aggregate."""
    clear_memo()
    with task_identity():
        spec = tiny_spec(tmp_path_factory.mktemp("ref") / "run", rounds=3, drop_after_rejections=2)
        grid = grid_for(spec)
        grid.offline = {HOSTILE_NODE}
        run_federation(grid, spec)
    return _weights(spec.run_dir)


@pytest.mark.parametrize("kind, code", [("nan", "non-finite"), ("huge", "norm"), ("noise", "num-examples")])
def test_hostile_update_is_rejected_by_name_and_the_model_equals_the_honest_aggregate(
        tmp_path, honest_only, kind: str, code: str) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=3, drop_after_rejections=2)
    grid = grid_for(spec, kind)
    folder = run_federation(grid, spec)
    rows = folder.read_metrics()
    assert {(r.round, r.site) for r in rows if r.metric == "rejected"} == {(1, "C"), (2, "C")}
    assert {(r.round, r.site) for r in rows if r.metric == f"rejected_{code}"} == {(1, "C"), (2, "C")}
    assert {(r.round, r.site) for r in rows if r.metric == "dropped"} == {(2, "C")}
    assert not any(r.site == "C" and r.phase == "train" and r.metric in ("num-examples", "failed") for r in rows)
    late = [m for m in grid.sent if m.metadata.dst_node_id == HOSTILE_NODE
            and m.content["config"].get("server-round") == 3]
    assert late == []  # dropped: neither trains nor evaluates in round 3
    assert folder.read_status()["state"] == "finished"
    assert "update of site C rejected" in (folder.path / "server.log").read_text()
    final = _weights(spec.run_dir)
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    diff = torch.sqrt(sum(((final[k].double() - honest_only[k].double()) ** 2).sum() for k in final))
    ref = torch.sqrt(sum((honest_only[k].double() ** 2).sum() for k in final))
    assert float(diff / ref) <= 1e-3


def test_a_round_with_every_update_rejected_fails_the_run_and_keeps_the_last_checkpoint(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=3)
    grid = grid_for(spec, "nan", nodes={1000, 1001, 1002}, from_round=2)
    folder = ServerRunFolder(spec.run_dir)
    before: dict[str, bytes] = {}

    def snapshot(messages: list[Message]) -> None:
        if messages and messages[0].metadata.message_type == MessageType.TRAIN and folder.has_checkpoint():
            before.setdefault("round 2", folder.checkpoint_path.read_bytes())

    grid.before_send = snapshot
    with pytest.raises(FederationFailed, match="round 2: no site update could be aggregated"):
        run_federation(grid, spec)
    status = folder.read_status()
    assert status["state"] == "failed" and status["round"] == 1 and "kept" in status["message"]
    assert folder.checkpoint_path.read_bytes() == before["round 2"]  # not overwritten
    assert all(bool(torch.isfinite(t).all()) for t in _weights(spec.run_dir).values())
    assert not (folder.path / "model.pt").exists()
    rows = folder.read_metrics()
    assert {r.site for r in rows if r.round == 2 and r.metric == "rejected"} == {"A", "B", "C"}


# ----------------------------------------------------------------- strategy level, hand-made replies
def _strategy(rows: list, **fed_kw):
    reg = SiteRegistry(NODES.values())
    for node, site in NODES.items():
        assert reg.register(node, site, NODES, declared=10)
    strat = build_strategy(FederationConfig(**fed_kw), registry=reg, recorder=lambda *r: rows.append(r), seed=0)
    return strat, reg


def test_dropped_site_is_no_longer_sampled_and_the_drop_survives_a_checkpoint() -> None:
    rows: list = []
    strat, reg = _strategy(rows, drop_after_rejections=2, min_sites=1)
    for rnd in (1, 2):
        sent = _configure(strat, {"w": [0.0]}, rnd)
        strat.aggregate_train(rnd, [_reply(sent[11], {"w": [1.0]}, _train_metrics(5)),
                                    _reply(sent[22], {"w": [2.0]}, _train_metrics(5)),
                                    _reply(sent[33], {"w": [1.0]}, _train_metrics(11))])  # > 10 declared
    assert [(r, s) for (r, _p, s, m, _v) in rows if m == "dropped"] == [(2, "C")]
    assert "exceeds the 10 training images" in strat.last_rejections["C"]
    assert set(_configure(strat, {"w": [0.0]}, 3)) == {11, 22}
    assert reg.connected(NODES) == {"A": 11, "B": 22}
    fresh, fresh_reg = _strategy([], drop_after_rejections=2)
    fresh.load_state_dict(strat.state_dict())
    assert fresh_reg.dropped == {"C"}


def test_wire_dtype_and_declared_count_are_enforced() -> None:
    rows: list = []
    strat, _reg = _strategy(rows)
    sent = _configure(strat, {"w": [0.0, 0.0]})
    as_f64 = Message(RecordDict({"metrics": MetricRecord(_train_metrics(5)),
                                 "arrays": ArrayRecord({PACKED_KEY: Array(np.array([1.0, 1.0]))})}), reply_to=sent[33])
    arrays, _ = strat.aggregate_train(1, [_reply(sent[11], {"w": [1.0, 1.0]}, _train_metrics(5)),
                                          _reply(sent[22], {"w": [3.0, 3.0]}, _train_metrics(5)), as_f64])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    assert "float64" in strat.last_rejections["C"] and set(strat.last_failures["train"]) == {"C"}
    assert ("C", "rejected_schema") in {(s, m) for (_r, _p, s, m, _v) in rows}


def test_aggregate_problem_names_a_non_finite_aggregate() -> None:
    assert aggregate_problem(ArrayRecord({"w": Array(np.ones(2, np.float32))}), {}) == ""
    bad = aggregate_problem(ArrayRecord({"w": Array(np.array([1.0, np.inf], np.float32))}), {})
    assert "not finite" in bad and "'w'" in bad
    assert "C: update rejected" in aggregate_problem(None, {"C": "update rejected: x"})
