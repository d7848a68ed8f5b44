"""server/app.py: the round loop on an in-process grid with the real ClientApp (tiny model,
synthetic sites): run folder contents, failures, bounded quorum wait, resume."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

import client.runtime as runtime
from client.app import make_client_app
from common.config import ConfigError
from common.device import seed_everything
from common.federation import (
    AGGREGATE_SITE,
    RunSpec,
    SiteSpec,
    build_experiment_model,
    norm_keys,
)
from common.fedmetrics import EVAL_METRIC_KEYS
from server.app import FederationStopped, resolve_server_spec, run_federation
from server.state import ServerRunFolder
from tests.server.local_grid import SITES, LocalGrid, killed_after, tiny_spec


def sim_grid(spec: RunSpec) -> LocalGrid:
    """Nodes as in simulation: node_config holds only the partition id."""
    n = len(spec.sites)
    return LocalGrid(make_client_app(spec),
                     {1000 + i: {"partition-id": i, "num-partitions": n} for i in range(n)})


class FakeClock:
    """Time that only moves when the loop sleeps (bounded waits without real waiting)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += max(s, 0.01)


def test_run_writes_checkpoint_metrics_and_config(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run")
    folder = run_federation(sim_grid(spec), spec)
    ck = folder.load(restore=False)
    assert ck.round == 2
    rows = folder.read_metrics()
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            sites = {r.site for r in rows if r.round == rnd and r.phase == phase}
            assert sites == {*SITES, AGGREGATE_SITE}
    assert folder.read_status()["state"] == "finished"
    assert (folder.path / "config.yaml").is_file() and (folder.path / "metrics.jsonl").is_file()
    log_text = (folder.path / "server.log").read_text()
    assert "site A joined" in log_text and "round 2 evaluate B" in log_text


def test_failing_site_is_named_left_out_and_its_error_text_is_sanitised(tmp_path, monkeypatch) -> None:
    spec = tiny_spec(tmp_path / "run")
    real = runtime.train_round

    def flaky(ctx, global_state, rc, local_norms=None, privacy=None):
        if ctx.site.name == "B" and rc.server_round == 2:
            raise FileNotFoundError("/hospital/B/patients/P0042/img_7.png")
        return real(ctx, global_state, rc, local_norms, privacy)

    monkeypatch.setattr("client.app.train_round", flaky)
    grid = sim_grid(spec)
    folder = run_federation(grid, spec)
    failed = {(r.round, r.site) for r in folder.read_metrics() if r.metric == "failed"}
    assert failed == {(2, "B")}
    errors = [m.error.reason for m in grid.replies if m.has_error()]
    assert len(errors) == 1 and "site B" in errors[0] and "FileNotFoundError" in errors[0]
    assert "P0042" not in errors[0] and "/hospital" not in errors[0]
    assert folder.load(restore=False).round == 2


def test_a_node_unavailable_at_its_first_query_is_asked_again_within_the_quorum_wait(tmp_path) -> None:
    """After a SuperLink restart a reconnecting node can answer its first query with an error;
    it must be queried again while the round waits, not shut out until the next round."""
    spec = tiny_spec(tmp_path / "run", rounds=1)
    spec = dataclasses.replace(spec, federation=dataclasses.replace(spec.federation, min_sites=3, quorum_timeout_s=30.0))
    grid = sim_grid(spec)
    real, flaky = grid.app, 1001
    calls: list[int] = []

    class FirstQueryFails:
        def __call__(self, msg, context):
            if context.node_id == flaky and msg.metadata.message_type == MessageType.QUERY and not calls:
                calls.append(flaky)
                raise ConnectionError("node unavailable")
            return real(msg, context)

    grid.app = FirstQueryFails()
    clock = FakeClock()
    folder = run_federation(grid, spec, clock=clock, sleep=clock.sleep, poll_s=1.0)
    assert calls == [flaky] and folder.read_status()["state"] == "finished"
    queried = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    assert queried.count(flaky) == 2 and clock.now < spec.federation.quorum_timeout_s


def test_no_quorum_stops_with_the_checkpoint_intact_and_resume_finishes(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", quorum_timeout_s=30.0)
    grid = sim_grid(spec)

    def drop_after_round_one(messages) -> None:
        if any(m.metadata.message_type == MessageType.EVALUATE for m in messages):
            grid.offline = {1001, 1002}

    grid.before_send = drop_after_round_one
    clock = FakeClock()
    with pytest.raises(FederationStopped, match="round 2: 1 site"):
        run_federation(grid, spec, clock=clock, sleep=clock.sleep)
    assert 30.0 <= clock.now < 32.0  # waited the quorum timeout, not forever
    folder = ServerRunFolder(spec.run_dir)
    assert folder.read_status()["state"] == "stopped"
    assert folder.load(restore=False).round == 1
    grid.offline, grid.before_send = set(), None
    run_federation(grid, spec, resume=True)
    assert folder.load(restore=False).round == 2


def test_existing_checkpoint_requires_resume(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    run_federation(sim_grid(spec), spec)
    with pytest.raises(FileExistsError, match="checkpoint"):
        run_federation(sim_grid(spec), spec)


def test_resume_reproduces_an_uninterrupted_run(tmp_path) -> None:
    straight = tiny_spec(tmp_path / "straight", rounds=3, strategy="fedadam")
    run_federation(sim_grid(straight), straight)
    part = tiny_spec(tmp_path / "part", rounds=3, strategy="fedadam")
    with killed_after(2):
        run_federation(sim_grid(part), part)
    assert ServerRunFolder(part.run_dir).load(restore=False).round == 2
    run_federation(sim_grid(part), part, resume=True)
    a = ServerRunFolder(straight.run_dir).load(restore=False)
    b = ServerRunFolder(part.run_dir).load(restore=False)
    assert a.round == b.round == 3
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=1e-5, atol=1e-6)
    assert [r.round for r in ServerRunFolder(part.run_dir).read_metrics() if r.metric == "train_loss"].count(3) == 4


def test_each_round_reaches_the_sites_as_its_place_in_the_run(tmp_path, monkeypatch) -> None:
    from common.schedule import RunPosition

    positions: list[RunPosition] = []
    real = runtime.train_local

    def spy(*args, **kwargs):
        positions.append(kwargs["position"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "train_local", spy)
    spec = tiny_spec(tmp_path / "run", rounds=2, local_epochs=2)
    run_federation(sim_grid(spec), spec)
    assert positions == [RunPosition(0, 4)] * len(SITES) + [RunPosition(2, 4)] * len(SITES)


def test_deployment_spec_comes_only_from_the_run_spec_file(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("experiment: {preset: smoke, federation: {rounds: 7, min_sites: 1}}\n"
                    "sites: [{name: A, synthetic_centre: SynPL}]\nrun_dir: out\n")
    spec, resume = resolve_server_spec(None, False, {"run-spec": str(path), "resume": True})
    assert spec.federation.rounds == 7 and spec.run_dir == str(tmp_path / "out") and resume
    assert spec.experiment.data.image_size == 32  # the smoke preset
    with pytest.raises(ConfigError, match="no run-spec"):  # no second door: pyproject keys are not read
        resolve_server_spec(None, False, {"num-server-rounds": 5, "strategy": "fedprox"})


def test_central_evaluation_writes_rows_for_held_out_centres(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1)
    spec = dataclasses.replace(spec, central_test=(SiteSpec("D", synthetic_centre="SynES2", synthetic_n=6),))
    folder = run_federation(sim_grid(spec), spec)
    central = [r for r in folder.read_metrics() if r.phase == "central"]
    assert {r.site for r in central} == {"D", AGGREGATE_SITE}
    by = {(r.site, r.metric): r.value for r in central}
    assert by[("D", "n_images")] == 6  # all of the held-out centre, not a split
    assert set(EVAL_METRIC_KEYS) <= {m for (s, m) in by if s == "D"}


def test_fedbn_resume_in_fresh_site_processes_matches_a_straight_run(tmp_path) -> None:
    """Deployment-like: every run gets new contexts (context.state empty), so the sites must
    find their own norm layers in their state folders; the result equals an uninterrupted run."""
    straight = tiny_spec(tmp_path / "straight", rounds=2, strategy="fedbn")
    run_federation(sim_grid(straight), straight)
    part = tiny_spec(tmp_path / "part", rounds=2, strategy="fedbn")
    with killed_after(1):
        run_federation(sim_grid(part), part)
    run_federation(sim_grid(part), part, resume=True)  # new grid: new, empty contexts
    a = ServerRunFolder(straight.run_dir).load(restore=False)
    b = ServerRunFolder(part.run_dir).load(restore=False)
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=1e-5, atol=1e-6)
    norms = norm_keys(build_experiment_model(straight.experiment))
    seed_everything(straight.experiment.train.seed)
    init = build_experiment_model(straight.experiment).state_dict()
    assert all(torch.equal(a.state_dict[k], init[k]) for k in norms)  # never averaged
    assert any(not torch.equal(a.state_dict[k], init[k]) for k in init if k not in norms)
    site_files = list((Path(part.run_dir) / "site-state").rglob("round_*.pt"))
    assert {p.parents[2].name for p in site_files} == set(SITES)
