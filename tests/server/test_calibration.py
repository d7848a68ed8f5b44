"""server/calibration.py in the round loop (in-process grid, real ClientApp): after the last
round every site gets one "calibrate" query with the final model, the server sums the valid
replies, and the fitted temperature lands in model.pt and its card; invalid replies are left out."""
from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

import client.app as client_app
from common import calibration
from common.federation import RunSpec, build_experiment_model
from common.modelcard import card_paths
from common.loaded_model import load_model
from common.modelfile import read_model
from common.sitedata import load_site_tensors
from server.app import run_federation
from server.calibration import MESSAGE_TYPE
from tests.server.local_grid import SITES, tiny_spec
from tests.server.test_app import sim_grid


def _net(spec: RunSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_experiment_model(spec.experiment)
    model.load_state_dict(state)
    return model


def _spec(tmp_path) -> RunSpec:
    """One round; 40 images a site, so the validation splits together hold enough to fit."""
    return tiny_spec(tmp_path / "run", rounds=1, synthetic_n=40)


def test_the_final_model_is_calibrated_on_the_sites_summed_statistics(tmp_path) -> None:
    spec = _spec(tmp_path)
    grid = sim_grid(spec)
    folder = run_federation(grid, spec)
    queries = [m for m in grid.sent if m.metadata.message_type == MESSAGE_TYPE]
    assert len(queries) == len(SITES)
    state, meta = read_model(folder.path / "model.pt")
    sent = queries[0].content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], state[k]) for k in state)  # the final model, as saved
    # the same fit, by hand: each site's statistics of the final weights, summed
    per_site = {}
    for site in spec.sites:
        train, val = load_site_tensors(site, spec.experiment.data, spec.cache_dir)
        per_site[site.name] = calibration.site_stats(_net(spec, state), spec.experiment, train, val)[0]
    merged = calibration.merge(per_site.values())
    want = calibration.fit_temperature(merged)
    assert merged.count >= calibration.MIN_COUNT
    assert meta["temperature"] == pytest.approx(want) and load_model(folder.path / "model.pt").temperatures == [want]
    cal = meta["calibration"]
    assert cal["centres"] == {s: st.count for s, st in per_site.items()} and cal["split"] == "validation"
    assert cal["federated"] is True and cal["n"] == merged.count
    card = json.loads(card_paths(folder.path / "model.pt")["json"].read_text())
    assert card["calibration"]["temperature"] == pytest.approx(want)
    assert card["evaluation"] is not None  # the round's per-site scores are kept
    assert "## Calibration" in card_paths(folder.path / "model.pt")["md"].read_text()


def test_invalid_or_failed_replies_are_left_out(tmp_path, monkeypatch, caplog) -> None:
    spec = _spec(tmp_path)
    real = client_app._calibrate

    def lying(msg, context, ctx, rc):
        reply = real(msg, context, ctx, rc)
        rec = dict(reply.content["calibration"])
        if ctx.site.name == "B":  # more images than it declared
            rec["count"] = 10_000
        if ctx.site.name == "C":  # a non-finite sum
            rec["nll"] = [math.nan] + list(rec["nll"][1:])
        return Message(RecordDict({"calibration": MetricRecord(rec)}), reply_to=msg)

    monkeypatch.setattr(client_app, "_calibrate", lying)
    folder = run_federation(sim_grid(spec), spec)
    _, meta = read_model(folder.path / "model.pt")
    assert list(meta["calibration"]["centres"]) == ["A"]
    assert "site B: reply refused" in caplog.text and "site C: reply refused" in caplog.text
    state, _ = read_model(folder.path / "model.pt")
    train, val = load_site_tensors(spec.sites[0], spec.experiment.data, spec.cache_dir)
    only_a = calibration.site_stats(_net(spec, state), spec.experiment, train, val)[0]
    assert meta["calibration"]["n"] == only_a.count
    assert meta["temperature"] == pytest.approx(calibration.fit_temperature(only_a))


def test_a_failed_query_leaves_the_finished_run_uncalibrated(tmp_path, caplog) -> None:
    spec = _spec(tmp_path)
    grid = sim_grid(spec)

    def stopped(messages) -> None:
        if any(m.metadata.message_type == MESSAGE_TYPE for m in messages):
            raise RuntimeError("run was stopped")

    grid.before_send = stopped
    folder = run_federation(grid, spec)
    _, meta = read_model(folder.path / "model.pt")
    assert meta["temperature"] == 1.0 and meta["calibration"] is None
    assert json.loads((folder.path / "status.json").read_text())["state"] == "finished"
    assert "calibration: the query failed" in caplog.text
