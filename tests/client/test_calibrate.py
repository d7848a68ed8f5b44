"""client/app.py's "calibrate" query: the final model's log-loss sums on the temperature grid
and the image count, on the site's validation split (training split without one), and nothing
else; a site whose terms require DP refuses."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from client.app import make_client_app
from client.runtime import SiteError
from common.calibration import GRID
from common.config import replace, to_dict
from common.data.tensors import TensorData
from common.federation import RunSpec, build_experiment_model
from common.inference import build_predictor, predict
from common.sitedata import load_site_tensors

CALIBRATE = f"{MessageType.QUERY}.calibrate"


def _ctx(node_config: dict[str, Any], node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def _msg(spec: RunSpec, state: dict[str, torch.Tensor]) -> Message:
    cfg = {"experiment": json.dumps(to_dict(spec.experiment)), "run-key": "testrun", "strategy": "fedavg",
           "num-rounds": 2}
    return Message(content=RecordDict({"config": ConfigRecord(cfg), "arrays": ArrayRecord(state)}),
                   dst_node_id=100, message_type=CALIBRATE)


def _state(spec: RunSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return build_experiment_model(spec.experiment).state_dict()


def _log_loss(spec: RunSpec, state: dict[str, torch.Tensor], data: TensorData) -> float:
    """Σ −log p(label) of the evaluation path's probabilities: the T = 1 grid entry, by hand."""
    model = build_experiment_model(spec.experiment)
    model.load_state_dict(state)
    _, p = predict(build_predictor([model], spec.experiment.inference), data, spec.experiment.inference)
    y = data.malignant.numpy() > 0.5
    return float(-np.log(np.where(y, p, 1 - p).astype(np.float64)).sum())


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_calibrate_reply_is_the_grid_sums_and_the_count_of_the_right_split(spec, val_fraction) -> None:
    spec = dataclasses.replace(spec, experiment=replace(spec.experiment, **{"data.val_fraction": val_fraction}))
    state = _state(spec)
    reply = make_client_app(spec)(_msg(spec, state), _ctx({"partition-id": 1, "num-partitions": 3}))
    assert set(reply.content.keys()) == {"calibration"}
    rec = dict(reply.content["calibration"])
    assert set(rec) == {"nll", "count"}
    train, val = load_site_tensors(spec.sites[1], spec.experiment.data, spec.cache_dir)
    data = val if val_fraction > 0 else train
    assert rec["count"] == len(data) > 0
    assert len(rec["nll"]) == len(GRID) and all(math.isfinite(v) and v > 0 for v in rec["nll"])
    assert rec["nll"][24] == pytest.approx(_log_loss(spec, state, data), rel=1e-4)


def test_a_site_that_requires_dp_refuses_to_calibrate(spec) -> None:
    node = {"site": "X", "synthetic-centre": "SynPL", "synthetic-n": 8, "privacy-required": True}
    with pytest.raises(SiteError, match="site X: calibrate refused"):
        make_client_app(spec)(_msg(spec, _state(spec)), _ctx(node))
