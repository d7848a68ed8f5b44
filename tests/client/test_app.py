"""client/app.py: what leaves a site (reply contents), identity resolution, error sanitising,
FedBN local state, FedProx wiring and deterministic local training."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.runtime import SiteError
from common.config import to_dict
from common.federation import (
    EVAL_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    UNDEFINED,
    RunSpec,
    build_experiment_model,
    norm_keys,
)
from common.sitedata import clear_memo
from tests.server.local_grid import task_identity, tiny_spec


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    clear_memo()
    with task_identity():
        yield


@pytest.fixture()
def spec(tmp_path) -> RunSpec:
    return tiny_spec(tmp_path / "run")


def _context(node_config: dict[str, Any], node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def _sim(pid: int, spec: RunSpec) -> Context:
    return _context({"partition-id": pid, "num-partitions": len(spec.sites)}, node_id=100 + pid)


def _msg(kind: str, spec: RunSpec, state: dict[str, torch.Tensor] | None = None, **config: Any) -> Message:
    cfg = {"experiment": json.dumps(to_dict(spec.experiment)), "run-key": "testrun",
           "strategy": "fedavg", "server-round": 1, "local-epochs": 1, **config}
    content = RecordDict({"config": ConfigRecord(cfg)})
    if state is not None:
        content["arrays"] = ArrayRecord(state)
    return Message(content=content, dst_node_id=100, message_type=kind)


def _init(spec: RunSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_experiment_model(spec.experiment).state_dict()


def _assert_numeric(record: Any) -> None:
    for key, value in record.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


def test_query_reply_holds_only_the_site_name_and_counts(spec) -> None:
    app = make_client_app(spec)
    reply = app(_msg(MessageType.QUERY, spec), _sim(1, spec))
    assert set(reply.content.keys()) == {"info"}
    info = dict(reply.content["info"])
    assert set(info) == {"site", "num-train", "num-val", "app-version"}
    assert info["site"] == "B" and info["num-train"] + info["num-val"] == 16 and info["num-val"] > 0


def test_train_reply_is_weights_plus_the_fixed_numeric_metrics(spec) -> None:
    app = make_client_app(spec)
    init = _init(spec)
    reply = app(_msg(MessageType.TRAIN, spec, init), _sim(0, spec))
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert tuple(reply.content["metrics"].keys()) == TRAIN_METRIC_KEYS
    _assert_numeric(reply.content["metrics"])
    assert reply.content["metrics"]["epsilon"] == UNDEFINED  # DP off
    new = reply.content["arrays"].to_torch_state_dict()
    assert list(new) == list(init)  # plain state_dict keys, none added or renamed
    assert any(not torch.equal(new[k], init[k]) for k in init)


def test_local_training_is_deterministic_per_round_and_site(spec) -> None:
    app = make_client_app(spec)
    init = _init(spec)

    def weights(pid: int, rnd: int) -> dict[str, torch.Tensor]:
        msg = _msg(MessageType.TRAIN, spec, init, **{"server-round": rnd})
        return app(msg, _sim(pid, spec)).content["arrays"].to_torch_state_dict()

    a, b, c = weights(0, 1), weights(0, 1), weights(0, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("n_cases", [16, 4])  # 4: a tiny site whose validation split is empty
def test_evaluate_reply_has_the_fixed_keys_and_never_nan(tmp_path, n_cases: int) -> None:
    spec = tiny_spec(tmp_path / "run", synthetic_n=n_cases)
    app = make_client_app(spec)
    num_val = app(_msg(MessageType.QUERY, spec), _sim(2, spec)).content["info"]["num-val"]
    reply = app(_msg(MessageType.EVALUATE, spec, _init(spec)), _sim(2, spec))
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    assert tuple(metrics.keys()) == EVAL_METRIC_KEYS
    _assert_numeric(metrics)
    assert metrics["n_images"] == metrics["num-examples"] == num_val
    if metrics["n_malignant"] in (0, metrics["n_images"]):  # one class only: AUC undefined
        assert metrics["auc"] == UNDEFINED
    if metrics["n_lesion"] == 0:
        assert metrics["dice"] == metrics["iou"] == metrics["hd95"] == UNDEFINED
    else:
        assert 0.0 <= metrics["dice"] <= 1.0


def test_deployment_identity_comes_from_node_config(spec, tmp_path) -> None:
    app = make_client_app()  # as deployed: no spec
    node = {"site": "Hosp1", "synthetic-centre": "SynES1", "synthetic-n": 12, "state-dir": str(tmp_path / "s")}
    reply = app(_msg(MessageType.QUERY, spec), _context(node))
    assert reply.content["info"]["site"] == "Hosp1"
    assert reply.content["info"]["num-train"] + reply.content["info"]["num-val"] == 12


def test_site_errors_reach_the_server_without_paths_or_ids(spec) -> None:
    app = make_client_app()
    node = {"site": "Hosp1", "data-path": "/secret/patients/P0042"}
    for kind in (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE):
        state = None if kind == MessageType.QUERY else _init(spec)
        with pytest.raises(SiteError) as info:
            app(_msg(kind, spec, state), _context(node))
        text = str(info.value)
        assert text.startswith(f"site Hosp1: {kind} failed (")
        assert "/secret" not in text and "P0042" not in text
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_simulation_with_a_different_site_count_is_refused(spec) -> None:
    app = make_client_app(spec)
    with pytest.raises(SiteError, match="site A: query failed \\(ConfigError\\)"):
        app(_msg(MessageType.QUERY, spec), _context({"partition-id": 0, "num-partitions": 5}))


def test_fedbn_keeps_norm_layers_at_the_site_and_on_disk(spec, monkeypatch) -> None:
    app = make_client_app(spec)
    init = _init(spec)
    nkeys = norm_keys(build_experiment_model(spec.experiment))
    ctx = _sim(0, spec)
    reply = app(_msg(MessageType.TRAIN, spec, init, strategy="fedbn"), ctx)
    sent_keys = set(reply.content["arrays"].keys())
    assert sent_keys == set(init) - nkeys and nkeys
    stored = ctx.state["fedbn-norms"].to_torch_state_dict()
    assert set(stored) == nkeys
    assert any(not torch.equal(stored[k], init[k]) for k in nkeys)  # trained, not the global's
    assert list((Path(spec.run_dir) / "site-state" / "A").rglob("round_00001.pt"))

    seen: dict[str, Any] = {}

    def capture(ctx_, global_state, rc, local_norms=None):
        seen["norms"] = local_norms
        return dict.fromkeys(EVAL_METRIC_KEYS, 0.0)

    monkeypatch.setattr("client.app.evaluate_round", capture)
    fresh = _sim(0, spec)  # deployment: a new process per message, context.state empty
    app(_msg(MessageType.EVALUATE, spec, init, strategy="fedbn"), fresh)
    assert set(seen["norms"]) == nkeys
    assert all(torch.equal(seen["norms"][k], stored[k]) for k in nkeys)


def test_fedprox_term_keeps_local_weights_closer_to_the_global_ones(spec) -> None:
    app = make_client_app(spec)
    init = _init(spec)

    def distance(**config: Any) -> float:
        msg = _msg(MessageType.TRAIN, spec, init, **{"local-epochs": 2, **config})
        new = app(msg, _sim(0, spec)).content["arrays"].to_torch_state_dict()
        return sum(float(((new[k] - init[k]) ** 2).sum()) for k in init)

    free = distance(strategy="fedavg", **{"proximal-mu": 100.0})  # mu ignored unless fedprox
    prox = distance(strategy="fedprox", **{"proximal-mu": 100.0})
    assert prox < free
