"""server/dp.py: the client-level DP factory builds each Flower wrapper and they act as stated."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant

from common.config import ConfigError
from common.federation import AGGREGATE_SITE, FederationConfig
from common.fedmetrics import TRAIN_METRIC_KEYS
from server.dp import (
    MODES,
    ClientDPConfig,
    client_level_epsilon,
    effective_noise_multiplier,
    planned_sampled_sites,
    wrap_client_dp,
)
from server.registry import SiteRegistry
from server.strategies import build_strategy
from tests.server.local_grid import task_identity

NODES = {11: "A", 22: "B", 33: "C"}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


class StubGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _inner(rows: list[tuple] | None = None, **fed: object):
    """FedAvg over NODES, every site registered; ``rows`` collects what it records."""
    reg = SiteRegistry(NODES.values())
    for node, site in NODES.items():
        reg.register(node, site, NODES)
    recorder = (lambda *r: rows.append(r)) if rows is not None else (lambda *r: None)
    return build_strategy(FederationConfig(**fed), registry=reg, recorder=recorder, seed=0)


def _metrics(n: float = 10.0) -> dict[str, float]:
    m = dict.fromkeys(TRAIN_METRIC_KEYS, 0.0)
    m["num-examples"] = n
    return m


def _round(strategy, global_w: list[float], replies_w: dict[int, list[float] | None]):
    """Configure one train round and aggregate hand-made replies (None: an error reply)."""
    sent = strategy.configure_train(1, ArrayRecord({"w": torch.tensor(global_w)}),
                                    ConfigRecord({"strategy": "fedavg"}), StubGrid(list(NODES)))
    sent = {m.metadata.dst_node_id: m for m in sent}
    replies = []
    for node, w in replies_w.items():
        if w is None:
            replies.append(Message(Error(code=2, reason="site failed"), reply_to=sent[node]))
        else:
            content = RecordDict({"arrays": ArrayRecord({"w": torch.tensor(w)}),
                                  "metrics": MetricRecord(_metrics())})
            replies.append(Message(content, reply_to=sent[node]))
    return sent, strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("mode, cls", [
    ("server-fixed", DifferentialPrivacyServerSideFixedClipping),
    ("client-fixed", DifferentialPrivacyClientSideFixedClipping),
])
def test_factory_builds_each_variant_and_delegates_our_strategy_api(mode: str, cls: type) -> None:
    inner = _inner()
    cfg = ClientDPConfig(mode=mode, noise_multiplier=0.5)
    wrapped = wrap_client_dp(inner, cfg, num_sampled_clients=3)
    assert isinstance(wrapped, cls) and wrapped.strategy is inner
    assert wrapped.state_dict() == inner.state_dict()  # server/app.py checkpoints through it
    assert wrapped.last_failures is inner.last_failures
    assert cfg.client_side == mode.startswith("client-")


def test_off_returns_the_strategy_and_bad_settings_are_config_errors() -> None:
    inner = _inner()
    assert wrap_client_dp(inner, ClientDPConfig(), 3) is inner
    assert MODES[0] == "off"
    with pytest.raises(ConfigError, match="FedBN"):
        wrap_client_dp(inner, ClientDPConfig(mode="client-fixed"), 3, fedbn=True)
    wrap_client_dp(inner, ClientDPConfig(mode="server-fixed"), 3, fedbn=True)  # server clips all keys
    with pytest.raises(ConfigError, match="mode"):
        ClientDPConfig(mode="local")
    cfg = ClientDPConfig.from_mapping({"mode": "server-fixed", "noise-multiplier": "0.8"})
    assert cfg.noise_multiplier == 0.8


def test_client_side_fixed_sends_the_clipping_norm() -> None:
    wrapped = wrap_client_dp(_inner(), ClientDPConfig(mode="client-fixed", clipping_norm=0.7), 3)
    sent = wrapped.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({}), StubGrid(list(NODES)))
    assert [m.content["config"]["clipping_norm"] for m in sent] == [0.7, 0.7, 0.7]


def test_server_fixed_clips_each_update_then_averages() -> None:
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=0.0, clipping_norm=1.0)
    wrapped = wrap_client_dp(_inner(), cfg, 3)
    # updates: (3,4) has norm 5 → (0.6, 0.8); (0.3, 0.4) and (-0.9, 0) are inside the ball
    _, (arrays, _) = _round(wrapped, [1.0, 1.0], {11: [4.0, 5.0], 22: [1.3, 1.4], 33: [0.1, 1.0]})
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.4], rtol=1e-6)


def test_an_exactly_zero_update_is_aggregated_not_a_crash() -> None:
    """Flower 1.41's clip_inputs_inplace divides by the update norm; our clipping does not."""
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=0.0)
    _, (arrays, _) = _round(wrap_client_dp(_inner(), cfg, 3), [0.0], {11: [1.0], 22: [1.0], 33: [0.0]})
    np.testing.assert_allclose(arrays["w"].numpy(), [2 / 3], rtol=1e-6)


def test_clipping_matches_arrays_by_name_not_position() -> None:
    """A reply with its keys in another order is clipped key by key (Flower zips by position)."""
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=0.0, clipping_norm=1.0)
    wrapped = wrap_client_dp(_inner(), cfg, 3)
    glob = ArrayRecord({"a": torch.zeros(1), "b": torch.zeros(1)})
    sent = {m.metadata.dst_node_id: m for m in
            wrapped.configure_train(1, glob, ConfigRecord({}), StubGrid(list(NODES)))}
    replies = [Message(RecordDict({"arrays": ArrayRecord({"b": torch.tensor([4.0]), "a": torch.tensor([3.0])}),
                                   "metrics": MetricRecord(_metrics())}), reply_to=sent[n]) for n in NODES]
    arrays, _ = wrapped.aggregate_train(1, replies)
    assert float(arrays["a"].numpy()[0]) == pytest.approx(0.6) and float(arrays["b"].numpy()[0]) == pytest.approx(0.8)


def test_a_malformed_update_is_left_to_the_screening_and_named() -> None:
    rows: list[tuple] = []
    inner = _inner(rows, packed_weights=False)
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=0.0, clipping_norm=10.0)
    wrapped = wrap_client_dp(inner, cfg, 3, num_sites=3)
    _, (arrays, _) = _round(wrapped, [0.0, 0.0], {11: [1.0, 1.0], 22: [3.0, 3.0], 33: [float("nan"), 0.0]})
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0], rtol=1e-6)  # mean of A and B only
    assert "C" in wrapped.last_failures["train"]  # the NaN update is rejected by name
    recorded = {r[3]: r[4] for r in rows if r[2] == AGGREGATE_SITE and r[3].startswith("client_dp_")}
    assert recorded["client_dp_updates"] == 2.0 and recorded["client_dp_clipping_norm"] == 10.0
    assert recorded["client_dp_effective_sigma"] == 0.0 and recorded["client_dp_epsilon"] == float("inf")


def test_each_release_records_sigma_clip_stdev_and_a_growing_epsilon() -> None:
    rows: list[tuple] = []
    inner = _inner(rows, packed_weights=False)
    cfg = ClientDPConfig(mode="client-fixed", noise_multiplier=2.0, clipping_norm=0.5, delta=1e-3)
    wrapped = wrap_client_dp(inner, cfg, 3, num_sites=3)
    for rnd in (1, 2):
        sent = {m.metadata.dst_node_id: m for m in wrapped.configure_train(
            rnd, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({}), StubGrid(list(NODES)))}
        assert {m.content["config"]["clipping_norm"] for m in sent.values()} == {0.5}
        replies = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.tensor([3.0, 4.0])}),
                                       "metrics": MetricRecord(_metrics())}), reply_to=sent[n]) for n in NODES]
        arrays, _ = wrapped.aggregate_train(rnd, replies)
        assert arrays is not None
    got = {(r[0], r[3]): r[4] for r in rows if r[3].startswith("client_dp_")}
    assert got[(1, "client_dp_noise_std")] == pytest.approx(2.0 * 0.5 / 3)
    assert got[(1, "client_dp_effective_sigma")] == 2.0  # equal weights: σ itself
    assert got[(1, "client_dp_epsilon")] == pytest.approx(client_level_epsilon(cfg, 1, 3, 3))
    assert got[(2, "client_dp_epsilon")] == pytest.approx(client_level_epsilon(cfg, 2, 3, 3))
    state = wrapped.state_dict()  # the history travels with the checkpoint (ε on resume)
    assert state["client_dp"]["effective_sigma"] == [2.0, 2.0]
    again = wrap_client_dp(_inner(), cfg, 3, num_sites=3)
    again.load_state_dict(state)
    assert again.history == [2.0, 2.0]


def test_planned_sampled_sites_follows_the_selection_rule() -> None:
    assert planned_sampled_sites(FederationConfig(min_sites=2), 3) == 3
    assert planned_sampled_sites(FederationConfig(min_sites=2, fraction_train=0.5), 5) == 2
    assert planned_sampled_sites(FederationConfig(min_sites=1, fraction_train=0.5), 6) == 3


def test_noise_stdev_is_sigma_clip_over_sampled_sites() -> None:
    np.random.seed(0)
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=1.5, clipping_norm=2.0)
    wrapped = wrap_client_dp(_inner(), cfg, 3)
    zeros, tiny = [0.0] * 20000, [1e-6] * 20000
    _, (arrays, _) = _round(wrapped, zeros, {11: tiny, 22: tiny, 33: tiny})
    assert float(np.std(arrays["w"].numpy())) == pytest.approx(1.5 * 2.0 / 3, rel=0.03)


def test_any_error_reply_skips_the_whole_aggregation() -> None:
    wrapped = wrap_client_dp(_inner(), ClientDPConfig(mode="server-fixed"), 3)
    _, (arrays, metrics) = _round(wrapped, [0.0], {11: [1.0], 22: [1.0], 33: None})
    assert arrays is None and metrics is None


def test_client_level_epsilon_matches_opacus_rdp_and_weights_reduce_noise() -> None:
    cfg = ClientDPConfig(mode="server-fixed", noise_multiplier=2.0, delta=1e-3)
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=2.0, sample_rate=1.0)
    assert client_level_epsilon(cfg, 10, 3, 3) == pytest.approx(acc.get_epsilon(1e-3))
    assert effective_noise_multiplier(2.0, [10, 10, 10]) == 2.0
    assert effective_noise_multiplier(2.0, [10, 20, 30]) == pytest.approx(2.0 * 20 / 30)
    assert client_level_epsilon(cfg, 10, 3, 3, weights=[10, 20, 30]) > client_level_epsilon(cfg, 10, 3, 3)
    assert client_level_epsilon(ClientDPConfig(), 10, 3, 3) == float("inf")
