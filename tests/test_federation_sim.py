"""One small federation end to end on Flower's simulation engine (Ray), as sim/ runs it:
three synthetic sites, a tiny U-Net, FedAvg; then resume (2 rounds + 1 == 3 rounds straight)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Before flwr is imported: its telemetry flag is read once, at import time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
pytest.importorskip("ray")

import flwr.supercore.telemetry as flwr_telemetry  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from client.app import make_client_app  # noqa: E402
from common.config import replace  # noqa: E402
from common.device import seed_everything  # noqa: E402
from common.federation import AGGREGATE_SITE, RunSpec, build_experiment_model  # noqa: E402
from server.app import make_server_app  # noqa: E402
from server.state import ServerRunFolder  # noqa: E402
from tests.server.local_grid import SITES, tiny_spec  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n


@pytest.fixture(scope="module", autouse=True)
def _offline_flower() -> Iterator[None]:
    """No telemetry or update check from the simulation runtime (nor from its Ray workers,
    which inherit the environment). The module flag is patched too, in case another test
    module imported flwr before the variables were set."""
    saved = {k: os.environ.get(k) for k in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")}
    flag = flwr_telemetry.FLWR_TELEMETRY_ENABLED
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    flwr_telemetry.FLWR_TELEMETRY_ENABLED = "0"
    yield
    flwr_telemetry.FLWR_TELEMETRY_ENABLED = flag
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def simulate(spec: RunSpec, resume: bool = False) -> ServerRunFolder:
    run_simulation(
        server_app=make_server_app(spec, resume=resume),
        client_app=make_client_app(spec),
        num_supernodes=len(spec.sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    return ServerRunFolder(spec.run_dir)


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> RunSpec:
    # a constant LR: extending the run to three rounds below leaves the first two unchanged
    # (a cosine's length would change; tests/server/test_app.py resumes a cosine run killed mid-way)
    spec = tiny_spec(tmp_path_factory.mktemp("sim") / "run", rounds=2)
    spec = replace(spec, experiment=replace(spec.experiment, **{"train.schedule": "constant"}))
    simulate(spec)
    return spec


def test_simulated_federation_writes_checkpoint_and_per_site_metrics(two_rounds) -> None:
    folder = ServerRunFolder(two_rounds.run_dir)
    ck = folder.load(restore=False)
    assert ck.round == 2 and folder.read_status()["state"] == "finished"
    rows = folder.read_metrics()
    for rnd in (1, 2):
        for phase in ("train", "evaluate"):
            named = {r.site for r in rows if r.round == rnd and r.phase == phase and r.metric == "num-examples"}
            assert named == {*SITES, AGGREGATE_SITE}, (rnd, phase, named)
    assert not [r for r in rows if r.metric == "failed"]
    seed_everything(two_rounds.experiment.train.seed)
    init = build_experiment_model(two_rounds.experiment).state_dict()
    assert set(ck.state_dict) == set(init)
    assert any(not torch.equal(ck.state_dict[k], init[k]) for k in init)


@pytest.mark.integration  # two more simulations: ~2 min on the shared 2-core machine
def test_resumed_simulation_equals_an_uninterrupted_one(two_rounds, tmp_path) -> None:
    """Resume from the fixture's round-2 checkpoint to round 3; compare with 3 rounds straight.
    (tests/server/test_app.py checks the same quickly on an in-process grid.)"""
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(two_rounds.run_dir, resumed_dir)
    three = replace(two_rounds, federation=replace(two_rounds.federation, rounds=3))
    simulate(replace(three, run_dir=str(resumed_dir)), resume=True)
    simulate(replace(three, run_dir=str(tmp_path / "straight")))
    a = ServerRunFolder(resumed_dir).load(restore=False)
    b = ServerRunFolder(tmp_path / "straight").load(restore=False)
    assert a.round == b.round == 3
    for key in b.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=1e-5, atol=1e-6)
    rounds = [r.round for r in ServerRunFolder(resumed_dir).read_metrics() if r.metric == "train_loss"]
    assert sorted(set(rounds)) == [1, 2, 3] and rounds.count(3) == len(SITES) + 1
    assert Path(resumed_dir, "config.yaml").is_file()
