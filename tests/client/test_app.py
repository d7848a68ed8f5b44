"""client/app.py: what leaves a site (reply contents), identity resolution, error sanitising,
FedBN local state, FedProx wiring and deterministic local training."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.runtime import SiteError
from common.config import PrivacyConfig, to_dict
from common.federation import RunSpec, build_experiment_model, norm_keys
from common.fedmetrics import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, UNDEFINED
from common.site_privacy import SitePrivacy
from tests.server.local_grid import LocalGrid, tiny_spec


def _context(node_config: dict[str, Any], node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def _sim(pid: int, spec: RunSpec) -> Context:
    return _context({"partition-id": pid, "num-partitions": len(spec.sites)}, node_id=100 + pid)


def _msg(kind: str, spec: RunSpec, state: dict[str, torch.Tensor] | None = None, *,
         dst_node_id: int = 100, **config: Any) -> Message:
    cfg = {"experiment": json.dumps(to_dict(spec.experiment)), "run-key": "testrun",
           "strategy": "fedavg", "server-round": 1, "num-rounds": 2, "local-epochs": 1, **config}
    content = RecordDict({"config": ConfigRecord(cfg)})
    if state is not None:
        content["arrays"] = ArrayRecord(state)
    return Message(content=content, dst_node_id=dst_node_id, message_type=kind)


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
    assert reply.content["metrics"]["epsilon_round"] == UNDEFINED
    new = reply.content["arrays"].to_torch_state_dict()
    assert list(new) == list(init)  # plain state_dict keys, none added or renamed
    assert any(not torch.equal(new[k], init[k]) for k in init)


def test_packed_instruction_gets_a_packed_reply_with_the_same_training(spec) -> None:
    """The server sends one flat vector (common/packing.py); the site trains exactly as on
    per-tensor weights and packs its reply the same way."""
    from flwr.app import Array

    from common.packing import PACKED_KEY, layout_of, layout_to_json, pack, unpack

    app = make_client_app(spec)
    init = _init(spec)
    flat, layout = pack({k: v.numpy() for k, v in init.items()})
    msg = _msg(MessageType.TRAIN, spec, None, packing=layout_to_json(layout))
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in flat.items()})
    reply = app(msg, _sim(0, spec)).content["arrays"]
    assert PACKED_KEY in reply and len(reply) == len(flat)
    packed_back = unpack({k: a.numpy() for k, a in reply.items()}, layout_of({k: v.numpy() for k, v in init.items()}))
    plain = app(_msg(MessageType.TRAIN, spec, init), _sim(0, spec)).content["arrays"].to_torch_state_dict()
    assert set(packed_back) == set(plain)
    for k in plain:
        np.testing.assert_array_equal(packed_back[k], plain[k].numpy())


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


@pytest.mark.parametrize("config", [{"num-rounds": 0},  # not sent: the run's length is unknown
                                    {"num-rounds": 3, "server-round": 4},
                                    {"num-rounds": 3, "server-round": 0}])
def test_a_round_the_site_cannot_place_in_the_run_is_refused(spec, config) -> None:
    app = make_client_app(spec)
    with pytest.raises(SiteError, match="site A: train failed \\(ConfigError\\)"):
        app(_msg(MessageType.TRAIN, spec, _init(spec), **config), _sim(0, spec))


def test_the_round_trains_at_its_place_in_the_run(spec, monkeypatch) -> None:
    """Round 3 of 4 with 2 local epochs: 4 of the run's 8 epochs lie before it, so the LR
    schedule and λ's warm-up continue where round 2 left them instead of restarting."""
    import client.runtime as runtime
    from common.schedule import RunPosition

    seen: list[RunPosition] = []
    real = runtime.train_local

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["position"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "train_local", spy)
    app = make_client_app(spec)
    msg = _msg(MessageType.TRAIN, spec, _init(spec),
               **{"server-round": 3, "num-rounds": 4, "local-epochs": 2})
    app(msg, _sim(0, spec))
    assert seen == [RunPosition(epoch_offset=4, total_epochs=8)]


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


# ------------------------------------------------------------------ DP-SGD at the site
_SIGMA = 1.0


def _dp_spec(spec: RunSpec, **privacy: Any) -> RunSpec:
    """The coordinator's request: DP-SGD with a fixed sigma (optionally capped)."""
    cfg = PrivacyConfig(**{"enabled": True, "noise_multiplier": _SIGMA, "target_epsilon": None,
                           "target_delta": 1e-3, **privacy})
    return dataclasses.replace(spec, experiment=dataclasses.replace(spec.experiment, privacy=cfg))


def _dp_node(tmp_path: Path, **terms: Any) -> dict[str, Any]:
    """A deployed site; ``terms``: its own privacy terms (SitePrivacy fields), as flower-client
    passes them through node_config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    node = {"site": "Hosp1", "synthetic-centre": "SynES1", "synthetic-n": 16,
            "state-dir": str(tmp_path / "state")}
    return {**node, **(SitePrivacy(**terms).node_config() if terms else {})}


def _expected_epsilon(app: Any, spec: RunSpec, node: dict[str, Any], rounds: int,
                      sigma: float = _SIGMA, delta: float = 1e-3) -> float:
    """epsilon after ``rounds`` one-epoch rounds, from the site's N and B by the accountant."""
    from common.accounting import epsilon_of, poisson_rate

    n = app(_msg(MessageType.QUERY, spec), _context(node)).content["info"]["num-train"]
    q, steps = poisson_rate(n, spec.experiment.train.batch_size)
    return epsilon_of([[sigma, q, steps * rounds]], delta)


def test_dp_site_reports_growing_epsilon_and_sends_plain_keys(spec, tmp_path) -> None:
    app = make_client_app()
    dp, node, init = _dp_spec(spec), _dp_node(tmp_path), _init(spec)
    ctx = _context(node)
    replies = [app(_msg(MessageType.TRAIN, dp, init, **{"server-round": r}), ctx) for r in (1, 2)]
    eps = [r.content["metrics"]["epsilon"] for r in replies]
    eps_round = [r.content["metrics"]["epsilon_round"] for r in replies]
    assert 0 < eps[0] < eps[1]
    assert eps[0] == pytest.approx(_expected_epsilon(app, spec, node, 1), rel=1e-6)
    assert eps[1] == pytest.approx(_expected_epsilon(app, spec, node, 2), rel=1e-6)
    assert eps_round[0] == pytest.approx(eps[0]) and eps_round[1] == pytest.approx(eps[1] - eps[0])
    for reply in replies:
        assert tuple(reply.content["metrics"].keys()) == TRAIN_METRIC_KEYS
        assert list(reply.content["arrays"].to_torch_state_dict()) == list(init)
    assert "privacy-state" in ctx.state.config_records


def test_dp_budget_continues_from_the_site_file_in_a_new_process(spec, tmp_path) -> None:
    app = make_client_app()
    dp, node, init = _dp_spec(spec), _dp_node(tmp_path), _init(spec)
    first = app(_msg(MessageType.TRAIN, dp, init), _context(node)).content["metrics"]["epsilon"]
    assert (tmp_path / "state" / "privacy" / "accountant.json").is_file()
    fresh = _context(node)  # new process: context.state is empty
    second = app(_msg(MessageType.TRAIN, dp, init, **{"server-round": 2}), fresh).content["metrics"]
    assert second["epsilon"] == pytest.approx(_expected_epsilon(app, spec, node, 2), rel=1e-6)
    assert second["epsilon"] > first and second["epsilon_round"] < second["epsilon"]


def test_dp_site_refuses_a_round_past_its_budget(spec, tmp_path) -> None:
    app = make_client_app()
    probe = _dp_node(tmp_path / "probe")
    one, two = (_expected_epsilon(app, spec, probe, r) for r in (1, 2))
    dp, node, init = _dp_spec(spec, target_epsilon=(one + two) / 2), _dp_node(tmp_path), _init(spec)
    grid = LocalGrid(app, {5: node})
    ok = list(grid.send_and_receive([_msg(MessageType.TRAIN, dp, init, dst_node_id=5)]))[0]
    assert not ok.has_error() and ok.content["metrics"]["epsilon"] == pytest.approx(one, rel=1e-6)
    reply = list(grid.send_and_receive([_msg(MessageType.TRAIN, dp, init, dst_node_id=5,
                                             **{"server-round": 2})]))[0]
    assert reply.has_error() and not reply.has_content()
    assert "site Hosp1" in reply.error.reason and "PrivacyBudgetExceeded" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason  # no paths leave the site
    ledger = json.loads((tmp_path / "state" / "privacy" / "accountant.json").read_text())
    assert ledger["epsilon"] == pytest.approx(one, rel=1e-6)  # the refused round spent nothing
