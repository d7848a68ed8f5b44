"""Client-level DP and SecAgg+ selected by the RunSpec alone, through the real ServerApp round
loops and the real ClientApp (its mods follow the run) on an in-process grid: tiny model,
synthetic sites, no site-side setting."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client.app import make_client_app
from common.clipping import is_counter
from common.config import ClientDPConfig, SecAggConfig
from common.federation import AGGREGATE_SITE, RunSpec
from server.app import run_federation
from server.secagg_app import run_secagg_spec
from server.state import ServerRunFolder
from tests.server.local_grid import LocalGrid, tiny_spec
from tests.server.test_app import sim_grid

CLIP = 0.01


class LegacyGrid(LocalGrid):
    """The in-process grid with the run the legacy workflow's client manager asks for, and a
    copy of the content per node, as over the wire (SecAgg+'s mod pops keys from its message)."""

    @property
    def run(self) -> Any:
        return SimpleNamespace(run_id=1)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            msg.content = copy.deepcopy(msg.content)
        return super().send_and_receive(messages, timeout=timeout)


def _dp_spec(tmp_path, mode: str) -> RunSpec:
    return tiny_spec(tmp_path / "run", rounds=1, packed_weights=False,
                     client_dp=ClientDPConfig(mode=mode, noise_multiplier=0.0, clipping_norm=CLIP))


def _recording(grid: LocalGrid) -> list[tuple[float, dict[str, np.ndarray]]]:
    """The train replies as the sites sent them (the server's clipping then works on the
    message objects themselves): [(num-examples, weights)]."""
    sent: list[tuple[float, dict[str, np.ndarray]]] = []
    app = grid.app

    def run(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            sent.append((float(reply.content["metrics"]["num-examples"]),
                         {k: a.numpy().astype(np.float64) for k, a in reply.content["arrays"].items()}))
        return reply

    grid.app = run  # type: ignore[assignment]
    return sent


def _legacy_grid(spec: RunSpec) -> LegacyGrid:
    n = len(spec.sites)
    return LegacyGrid(make_client_app(spec), {1000 + i: {"partition-id": i, "num-partitions": n} for i in range(n)})


def _norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The clipped norm: every array but the prior's step counter (common.clipping.is_counter)."""
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b if not is_counter(k)))


@pytest.mark.parametrize("mode", ["client-fixed", "server-fixed"])
def test_client_dp_from_the_spec_clips_where_the_mode_says(tmp_path, mode: str) -> None:
    spec = _dp_spec(tmp_path, mode)
    grid = sim_grid(spec)
    replies = _recording(grid)
    folder = run_federation(grid, spec)
    train = next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    glob = {k: a.numpy().astype(np.float64) for k, a in train.content["arrays"].items()}
    assert ("clipping_norm" in train.content["config"]) == (mode == "client-fixed")
    assert len(replies) == 3
    norms = [_norm(w, glob) for _, w in replies]
    if mode == "client-fixed":  # the sites clipped, asked by the round's config
        assert max(norms) <= CLIP * (1 + 1e-4)
    else:  # the sites sent their raw update; the server clips
        assert min(norms) > 2 * CLIP
    # σ = 0: the model moved by the weighted mean of the updates clipped to C
    total = sum(n for n, _ in replies)
    expected = {k: glob[k] + sum(n * (w[k] - glob[k]) * min(1.0, CLIP / nm)
                                 for (n, w), nm in zip(replies, norms)) / total for k in glob}
    final = {k: v.numpy().astype(np.float64) for k, v in folder.load(restore=False).state_dict.items()}
    assert _norm(final, expected) <= 1e-6 + 1e-5 * CLIP
    rows = {r.metric: r.value for r in folder.read_metrics() if r.site == AGGREGATE_SITE and r.metric.startswith("client_dp_")}
    assert rows["client_dp_clipping_norm"] == CLIP and rows["client_dp_updates"] == 3.0
    assert rows["client_dp_noise_std"] == 0.0 and rows["client_dp_epsilon"] == math.inf  # σ = 0: no guarantee
    assert folder.read_status()["state"] == "finished"


def test_secagg_from_the_spec_runs_the_masked_workflow_through_the_regular_client_app(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    spec = dataclasses.replace(spec, federation=dataclasses.replace(
        spec.federation, secagg=SecAggConfig(enabled=True, num_shares=3, reconstruction_threshold=2,
                                             clipping_range=0.5, max_weight=64.0)))
    grid = _legacy_grid(spec)  # the regular ClientApp (client/app.py), nothing SecAgg-specific
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    folder = run_secagg_spec(grid, context, spec)
    assert folder.read_status()["state"] == "finished"
    assert {(r.round, r.value) for r in folder.read_metrics() if r.metric == "secagg_updates"} == {(1, 3.0)}
    assert not any(r.has_error() for r in grid.replies), [r.error.reason for r in grid.replies if r.has_error()]
    assert not any("arrays" in m.content.array_records for m in grid.sent)  # only SecAgg+/legacy messages
    masked = [r for r in grid.replies if "fitres.parameters" in r.content.array_records]
    assert masked and all(len(r.content["fitres.parameters"]) == 0 for r in masked)  # vectors left masked
    assert (folder.path / "model.pt").is_file()
    with pytest.raises(FileExistsError, match="do not resume"):
        run_secagg_spec(_legacy_grid(spec), context, spec)
    assert ServerRunFolder(spec.run_dir).load(restore=False).round == 1


def test_a_sites_own_privacy_terms_hold_under_secagg(tmp_path) -> None:
    """DP is off in the run, one site requires it: that site refuses to train (the regular app's
    privacy hook runs inside the SecAgg+ client too) and the masked sum goes on with the other two."""
    spec = tiny_spec(tmp_path / "run", rounds=1)
    spec = dataclasses.replace(spec, federation=dataclasses.replace(
        spec.federation, secagg=SecAggConfig(enabled=True, num_shares=3, reconstruction_threshold=2,
                                             clipping_range=0.5, max_weight=64.0)))
    grid = _legacy_grid(spec)
    grid.contexts[1002].node_config["privacy-required"] = True
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    folder = run_secagg_spec(grid, context, spec)
    assert {(r.round, r.value) for r in folder.read_metrics() if r.metric == "secagg_updates"} == {(1, 2.0)}
    refused = [r for r in grid.replies if r.has_error()]
    assert len(refused) == 1 and refused[0].metadata.src_node_id == 1002
    assert "site C: fit failed (SitePrivacyRefused)" in refused[0].error.reason
