"""sim/federated.py with client-level DP and SecAgg+ from the settings: the settings reach the
unit's RunSpec, a SecAgg+ unit's completeness is read from the masked sums' sizes, and an
interrupted SecAgg+ unit starts over instead of resuming."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.config import ConfigError, ExperimentConfig
from common.settings import load_settings
from sim import leave_center_out as lco
from sim.federated import (
    client_level_spent,
    federated_spec,
    masked_rounds_short,
    run_simulation_spec,
)
from sim.protocols import Runtime, plan_units

HEADER = "round,phase,site,metric,value\n"


def _spec(tmp_path: Path, *items: str):
    settings = load_settings("smoke", ["federation.rounds=2", "sim.protocols=[federated]", "sim.strategies=[fedavg]",
                                       "sim.held_out=[SynPL]", *items])
    sites = lco.site_specs(settings.sim)
    (pu,) = plan_units(settings, list(sites), "SynPL")
    return federated_spec(pu, ExperimentConfig(), settings, Runtime(sites=sites, cache_dir=None, scratch=tmp_path))


def test_the_units_spec_carries_both_settings(tmp_path) -> None:
    spec = _spec(tmp_path, "federation.client_dp.mode=server-fixed", "federation.packed_weights=false")
    assert spec.federation.client_dp.mode == "server-fixed" and not spec.federation.packed_weights
    assert _spec(tmp_path, "federation.secagg.enabled=true").federation.secagg.enabled


def test_masked_sums_short_of_every_site_and_the_last_client_level_epsilon(tmp_path) -> None:
    (tmp_path / "metrics.csv").write_text(HEADER + "1,train,all-sites,secagg_updates,3.0\n"
                                          "2,train,all-sites,secagg_updates,2.0\n"
                                          "1,train,all-sites,client_dp_epsilon,1.5\n"
                                          "2,train,all-sites,client_dp_epsilon,2.25\n")
    assert masked_rounds_short(tmp_path, 3, 3) == [(2, "masked updates: 2 of 3"), (3, "masked updates: 0 of 3")]
    assert masked_rounds_short(tmp_path, 2, 2) == []
    assert client_level_spent(tmp_path) == 2.25
    assert math.isnan(client_level_spent(tmp_path / "none"))


def test_an_interrupted_secagg_unit_starts_over(tmp_path, monkeypatch) -> None:
    import flwr.simulation

    import server.app

    calls: list[bool] = []
    monkeypatch.setattr(server.app, "make_server_app", lambda spec, resume, quiet: calls.append(resume))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_: None)
    spec = _spec(tmp_path, "federation.secagg.enabled=true")
    run = Path(spec.run_dir)
    run.mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.csv"):
        (run / name).write_text("x")
    (run / "status.json").write_text(json.dumps({"state": "running", "round": 1, "message": ""}))
    run_simulation_spec(spec)
    assert calls == [False]  # not resumed
    assert not any((run / n).exists() for n in ("checkpoint.pt", "metrics.csv", "status.json"))


def test_a_strategy_that_cannot_run_private_is_refused_before_the_run(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"\['fedbn'\] cannot run with federation.secagg"):
        _spec(tmp_path, "federation.secagg.enabled=true", "sim.strategies=[fedbn]")
