"""server/strategy.py and server/strategies.py: site naming, selection, screening and aggregation on hand-made replies."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common.config import ConfigError
from common.federation import AGGREGATE_SITE, FederationConfig
from common.fedmetrics import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS
from server.registry import SiteRegistry
from server.strategies import build_strategy
from tests.server.local_grid import task_identity

NODES = {11: "A", 22: "B", 33: "C"}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


class StubGrid:
    """Only what selection uses: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _registry() -> SiteRegistry:
    reg = SiteRegistry(NODES.values())
    for node, site in NODES.items():
        assert reg.register(node, site, NODES)
    return reg


def _strategy(name: str = "fedavg", rows: list | None = None, batch_size: int = 1, **fed_kw):
    rows = rows if rows is not None else []
    fed = FederationConfig(strategy=name, **fed_kw)
    strat = build_strategy(fed, registry=_registry(), recorder=lambda *r: rows.append(r), seed=0,
                           norm_keys=frozenset({"norm"}), buffer_keys=frozenset({"stat"}), batch_size=batch_size)
    return strat, rows


def _train_metrics(n: float, loss: float = 1.0) -> dict[str, float]:
    m = dict.fromkeys(TRAIN_METRIC_KEYS, 0.0)
    m.update({"num-examples": n, "n_decoder": n, "n_head": n, "train_loss": loss, "seconds": n})
    return m


def _reply(instr: Message, arrays: dict[str, list[float]] | None, metrics: dict[str, float]) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: torch.tensor(v) for k, v in arrays.items()})
    return Message(content, reply_to=instr)


def _configure(strat, arrays: dict[str, list[float]], rnd: int = 1) -> dict[int, Message]:
    rec = ArrayRecord({k: torch.tensor(v) for k, v in arrays.items()})
    msgs = strat.configure_train(rnd, rec, ConfigRecord({"strategy": "x"}), StubGrid(list(NODES)))
    return {m.metadata.dst_node_id: m for m in msgs}


def test_selection_is_by_site_name_reproducible_and_bounded_by_fraction() -> None:
    strat, _ = _strategy(fraction_train=0.5, min_sites=1)
    grid = StubGrid([33, 11, 22])
    picks = [strat.select(r, "train", 0.5, grid) for r in (1, 1)]
    assert picks[0] == picks[1] and len(picks[0]) == 1  # floor(0.5 * 3) = 1
    assert len(strat.select(1, "train", 1.0, grid)) == 3
    quorum, _ = _strategy(fraction_train=0.5, min_sites=2)
    assert len(quorum.select(1, "train", 0.5, grid)) == 2  # never fewer than the quorum
    draws = {tuple(strat.select(r, "train", 0.5, grid)) for r in range(1, 30)}
    assert len(draws) > 1  # the seed changes with the round


def test_fedavg_weights_by_examples_and_records_per_site_rows() -> None:
    strat, rows = _strategy()
    sent = _configure(strat, {"w": [0.0, 0.0], "norm": [1.0]})
    replies = [
        _reply(sent[11], {"w": [1.0, 1.0], "norm": [2.0]}, _train_metrics(1, loss=1.0)),
        _reply(sent[22], {"w": [3.0, 3.0], "norm": [4.0]}, _train_metrics(3, loss=3.0)),
        _reply(sent[33], {"w": [5.0, 5.0], "norm": [6.0]}, _train_metrics(4, loss=5.0)),
    ]
    arrays, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [(1 + 9 + 20) / 8] * 2)
    np.testing.assert_allclose(arrays["norm"].numpy(), [(2 + 12 + 24) / 8])
    by = {(site, metric): value for (_r, phase, site, metric, value) in rows if phase == "train"}
    assert by[("A", "train_loss")] == 1.0 and by[("C", "num-examples")] == 4
    assert by[(AGGREGATE_SITE, "train_loss")] == pytest.approx((1 + 9 + 20) / 8)
    assert by[(AGGREGATE_SITE, "seconds")] == 4  # the slowest site
    assert by[(AGGREGATE_SITE, "sites_ok")] == 3


def test_failed_malformed_and_silent_sites_are_named_and_the_round_completes() -> None:
    strat, rows = _strategy()
    sent = _configure(strat, {"w": [0.0], "norm": [1.0]})
    bad_keys = {**_train_metrics(5), "extra": 1.0}
    replies = [
        _reply(sent[11], {"w": [2.0], "norm": [1.0]}, _train_metrics(2)),
        Message(Error(code=2, reason="site B: train failed (DataError)"), reply_to=sent[22]),
    ]
    arrays, _ = strat.aggregate_train(1, replies)  # C never answered
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0])
    failed = {site for (_r, _p, site, metric, _v) in rows if metric == "failed"}
    assert failed == {"B", "C"}
    assert "DataError" in strat.last_failures["train"]["B"]
    assert "timeout" in strat.last_failures["train"]["C"]
    # a reply with a metric key the others lack is left out instead of voiding the round
    strat2, rows2 = _strategy()
    sent2 = _configure(strat2, {"w": [0.0], "norm": [1.0]})
    arrays2, _ = strat2.aggregate_train(1, [
        _reply(sent2[11], {"w": [2.0], "norm": [1.0]}, _train_metrics(2)),
        _reply(sent2[22], {"w": [9.0], "norm": [1.0]}, bad_keys),
        _reply(sent2[33], {"w": [4.0], "norm": [1.0]}, _train_metrics(2)),
    ])
    np.testing.assert_allclose(arrays2["w"].numpy(), [3.0])
    assert "metric keys" in strat2.last_failures["train"]["B"]


def test_superlink_error_for_a_vanished_node_is_named_after_that_site() -> None:
    """A node that dies mid-round is answered for by the SuperLink itself (src node id 1,
    reply_to = the instruction's id): the failure must carry the dead site's name."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strat, rows = _strategy()
    sent = _configure(strat, {"w": [0.0], "norm": [1.0]})
    for node, msg in sent.items():  # what the grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = f"id-{node}"
    vanished = create_message_error_unavailable_res_message(sent[33].metadata, "NODE_UNAVAILABLE")
    assert vanished.metadata.src_node_id == SUPERLINK_NODE_ID
    replies = [_reply(sent[11], {"w": [2.0], "norm": [1.0]}, _train_metrics(2)),
               _reply(sent[22], {"w": [4.0], "norm": [1.0]}, _train_metrics(2)), vanished]
    arrays, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0])
    assert {site for (_r, _p, site, metric, _v) in rows if metric == "failed"} == {"C"}
    assert "error reply" in strat.last_failures["train"]["C"]


def test_packed_replies_are_unpacked_aggregated_and_checked_against_the_layout() -> None:
    from flwr.app import Array

    from common.packing import PACKED_KEY, pack

    strat, _rows = _strategy("fedbn")  # "norm" stays at the sites: replies pack "w" only
    sent = _configure(strat, {"w": [0.0, 0.0], "norm": [1.0]})
    assert set(sent[11].content["arrays"].keys()) == {PACKED_KEY}
    assert "packing" in sent[11].content["config"]

    def packed_reply(instr: Message, w: list[float]) -> Message:
        flat, _ = pack({"w": np.array(w, np.float32)})
        content = RecordDict({"metrics": MetricRecord(_train_metrics(2)),
                              "arrays": ArrayRecord({k: Array(v) for k, v in flat.items()})})
        return Message(content, reply_to=instr)

    arrays, _ = strat.aggregate_train(1, [packed_reply(sent[11], [2.0, 4.0]), packed_reply(sent[22], [4.0, 8.0]),
                                          packed_reply(sent[33], [1.0])])  # C: wrong length
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 6.0])
    np.testing.assert_allclose(arrays["norm"].numpy(), [1.0])
    assert "layout needs 2" in strat.last_failures["train"]["C"]


def test_nan_metric_or_foreign_array_keys_are_malformed() -> None:
    strat, _ = _strategy()
    sent = _configure(strat, {"w": [0.0], "norm": [1.0]})
    nan = {**_train_metrics(1), "train_loss": float("nan")}
    arrays, _ = strat.aggregate_train(1, [
        _reply(sent[11], {"w": [1.0], "norm": [1.0]}, nan),
        _reply(sent[22], {"w": [1.0], "other": [1.0]}, _train_metrics(1)),
        _reply(sent[33], {"w": [7.0], "norm": [1.0]}, _train_metrics(1)),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), [7.0])
    assert set(strat.last_failures["train"]) == {"A", "B"}


def test_aggregate_keeps_the_global_dtypes_and_shapes() -> None:
    strat, _ = _strategy()
    rec = ArrayRecord({"w": torch.tensor([0.0]), "norm": torch.tensor(1.0), "count": torch.tensor([2])})
    sent = {m.metadata.dst_node_id: m for m in
            strat.configure_train(1, rec, ConfigRecord(), StubGrid(list(NODES)))}
    replies = [_reply(sent[n], {"w": [1.0], "norm": 1.0}, _train_metrics(1)) for n in (11, 22)]
    for r in replies:
        r.content["arrays"]["count"] = ArrayRecord({"c": torch.tensor([3])})["c"]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays["count"].numpy().dtype == np.int64 and arrays["w"].numpy().dtype == np.float32
    assert arrays["norm"].numpy().shape == ()  # 0-d buffers stay 0-d


def test_fedbn_averages_all_but_the_norm_layers() -> None:
    strat, _ = _strategy("fedbn")
    sent = _configure(strat, {"w": [0.0], "norm": [1.0]})
    arrays, _ = strat.aggregate_train(1, [
        _reply(sent[11], {"w": [1.0]}, _train_metrics(1)),
        _reply(sent[22], {"w": [3.0]}, _train_metrics(1)),
        _reply(sent[33], {"w": [5.0], "norm": [9.0]}, _train_metrics(1)),  # leaked norm: refused
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0])
    np.testing.assert_allclose(arrays["norm"].numpy(), [1.0])  # the global keeps its value
    assert set(strat.last_failures["train"]) == {"C"}


def test_fedmedian_takes_the_coordinate_median() -> None:
    strat, _ = _strategy("fedmedian")
    sent = _configure(strat, {"w": [0.0, 0.0], "norm": [0.0]})
    arrays, _ = strat.aggregate_train(1, [
        _reply(sent[11], {"w": [1.0, 100.0], "norm": [0.0]}, _train_metrics(1)),
        _reply(sent[22], {"w": [2.0, 5.0], "norm": [0.0]}, _train_metrics(50)),
        _reply(sent[33], {"w": [30.0, 6.0], "norm": [0.0]}, _train_metrics(1)),
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 6.0])


def test_fedprox_sends_mu_and_fedavg_does_not() -> None:
    strat, _ = _strategy("fedprox", proximal_mu=0.25)
    msgs = _configure(strat, {"w": [0.0], "norm": [0.0]}, rnd=3)
    cfg = msgs[11].content["config"]
    assert cfg["proximal-mu"] == 0.25 and cfg["server-round"] == 3
    strat2, _ = _strategy("fedavg")
    assert "proximal-mu" not in _configure(strat2, {"w": [0.0], "norm": [0.0]})[11].content["config"]


def test_fedadam_server_state_round_trips() -> None:
    def one_round(strat, rnd: int, start: float, site_w: float):
        sent = _configure(strat, {"w": [start], "norm": [0.0]}, rnd)
        arrays, _ = strat.aggregate_train(rnd, [
            _reply(sent[n], {"w": [site_w], "norm": [0.0]}, _train_metrics(1)) for n in (11, 22)])
        return float(arrays["w"].numpy()[0])

    a, _ = _strategy("fedadam", server_lr=0.1)
    w1 = one_round(a, 1, 0.0, 1.0)
    assert 0.0 < w1 < 1.0
    saved = a.state_dict()
    assert set(saved) == {"m_t", "v_t"}
    w2 = one_round(a, 2, w1, 2.0)
    b, _ = _strategy("fedadam", server_lr=0.1)
    b.load_state_dict(saved)
    assert one_round(b, 2, w1, 2.0) == w2
    c, _ = _strategy("fedadam", server_lr=0.1)  # without the moments the step differs
    assert one_round(c, 2, w1, 2.0) != w2


def test_fedavgm_adds_server_momentum_by_name_to_floats_only_and_checkpoints_it() -> None:
    def one_round(strat, rnd: int, start: float, site_w: float, count: int = 0):
        sent = _configure(strat, {"w": [start], "norm": [0.0], "count": count}, rnd)
        arrays, _ = strat.aggregate_train(rnd, [_reply(sent[n], {"w": [site_w], "norm": [0.0],
                                                                  "count": count + 2},
                                                       _train_metrics(1)) for n in (11, 22)])
        return float(arrays["w"].numpy()[0]), arrays["count"].numpy()

    a, _ = _strategy("fedavgm", server_momentum=0.9)
    w1, count = one_round(a, 1, 0.0, 1.0)
    assert w1 == 1.0  # round 1: m = Δ, the FedAvg step
    assert count == 2 and count.dtype == np.int64  # counters averaged, no momentum
    saved = a.state_dict()
    w2, _ = one_round(a, 2, w1, 2.0)
    assert w2 == pytest.approx(1.0 + 0.9 * 1.0 + 1.0)  # m = 0.9·m + Δ = 1.9 (an update is −Δ)
    b, _ = _strategy("fedavgm", server_momentum=0.9)
    b.load_state_dict(saved)  # resumed: the momentum survives the checkpoint
    assert one_round(b, 2, w1, 2.0)[0] == w2
    with pytest.raises(ConfigError, match="server_momentum"):
        FederationConfig(strategy="fedavgm", server_momentum=1.0)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimisers_step_parameters_and_leave_statistics_to_the_weighted_mean(name: str) -> None:
    """A running variance stepped with momentum or Adam can leave its range (negative → NaN);
    buffers take the num-examples-weighted mean, as under FedAvg, round after round."""
    strat, _ = _strategy(name, server_lr=0.1)
    w, stat = 0.0, 1.0
    for rnd in (1, 2, 3):
        sent = _configure(strat, {"w": [w], "norm": [0.0], "stat": [stat]}, rnd)
        arrays, _ = strat.aggregate_train(rnd, [
            _reply(sent[11], {"w": [w + 1.0], "norm": [0.0], "stat": [stat - 0.3]}, _train_metrics(1)),
            _reply(sent[22], {"w": [w + 1.0], "norm": [0.0], "stat": [stat - 0.6]}, _train_metrics(2))])
        expected = stat - (0.3 * 1 + 0.6 * 2) / 3
        assert float(arrays["stat"].numpy()[0]) == pytest.approx(expected, abs=1e-6)
        w, stat = float(arrays["w"].numpy()[0]), expected
    assert w > 0.0 and stat == pytest.approx(1.0 - 3 * 0.5)  # the parameter moved by the server step
    assert "stat" not in getattr(strat, "momentum", {})


def test_evaluate_rows_per_site_and_pooled() -> None:
    strat, rows = _strategy()
    grid = StubGrid(list(NODES))
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_evaluate(
        1, ArrayRecord({"w": torch.tensor([0.0])}), ConfigRecord(), grid)}
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in msgs.values())

    def ev(dice: float, n_lesion: float) -> dict[str, float]:
        m = dict.fromkeys(EVAL_METRIC_KEYS, 1.0)
        m.update({"dice": dice, "n_lesion": n_lesion, "num-examples": 4.0, "n_images": 4.0})
        return m

    strat.aggregate_evaluate(1, [_reply(msgs[11], None, ev(0.2, 1)), _reply(msgs[22], None, ev(0.6, 3)),
                                 _reply(msgs[33], None, ev(-1.0, 0))])
    by = {(site, metric): v for (_r, phase, site, metric, v) in rows if phase == "evaluate"}
    assert by[("B", "dice")] == 0.6 and by[("C", "dice")] == -1.0
    assert by[(AGGREGATE_SITE, "dice")] == pytest.approx(0.5)
