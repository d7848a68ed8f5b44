"""SecAgg+ mode end to end on Flower's simulation engine (Ray): three synthetic sites, a tiny
U-Net; the securely aggregated update equals the weighted mean of the sites' own updates up to
the quantisation error."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("ray")

from flwr.simulation import run_simulation  # noqa: E402

from client.secagg_app import make_secagg_client_app  # noqa: E402
from common.data.synthetic import SYNTHETIC_CENTRES  # noqa: E402
from common.federation import SiteSpec  # noqa: E402
from server.secagg_app import SecAggConfig, make_secagg_server_app  # noqa: E402
from server.state import ServerRunFolder  # noqa: E402
from tests.server.local_grid import SITES, tiny_spec  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n
SECAGG = SecAggConfig(num_shares=3, reconstruction_threshold=2, clipping_range=0.5, max_weight=64.0)


@pytest.fixture(scope="module", autouse=True)
def _offline_flower() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")}
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    spec = tiny_spec(root / "run", rounds=1, synthetic_n=16, fraction_evaluate=1.0)
    spec = dataclasses.replace(spec, sites=tuple(  # three distinct synthetic centres
        SiteSpec(name, synthetic_centre=centre, synthetic_n=16)
        for name, centre in zip(SITES, sorted(SYNTHETIC_CENTRES))))
    seen: dict[int, dict[str, np.ndarray]] = {}
    run_simulation(
        server_app=make_secagg_server_app(spec, SECAGG, on_round=lambda r, w: seen.setdefault(r, w)),
        client_app=make_secagg_client_app(spec, record_dir=str(root / "sent")),
        num_supernodes=len(spec.sites),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )
    return spec, seen, root / "sent"


def test_secagg_run_completes_and_writes_the_run_folder(secagg_run) -> None:
    spec, seen, _ = secagg_run
    assert sorted(seen) == [0, 1]
    folder = ServerRunFolder(spec.run_dir)
    assert folder.read_status()["state"] == "finished"
    assert folder.load(restore=False).round == 1
    metrics = {(r.phase, r.metric) for r in folder.read_metrics()}
    assert ("train", "num-examples") in metrics and ("evaluate", "dice") in metrics


def test_secure_mean_equals_the_weighted_mean_of_the_site_updates(secagg_run) -> None:
    _, seen, sent = secagg_run
    initial, after = seen[0], seen[1]
    records = [np.load(sent / site / "round_00001.npz") for site in SITES]  # each site's own record
    keys = [str(k) for k in records[0]["keys"]]
    assert keys == list(initial)
    weights = [float(r["num_examples"]) for r in records]
    total, scales = sum(weights), records[0]["scales"]
    # stochastic rounding of each site's weighted share, then division by the summed weights
    step = 2 * SECAGG.clipping_range / SECAGG.quantization_range
    base_tol = len(SITES) * step / (total / SECAGG.max_weight)
    largest = 0.0
    for i, key in enumerate(keys):
        mean = sum(w * r[f"arr_{i}"] for w, r in zip(weights, records)) / total / scales[i]
        got = after[key].astype(np.float64) - initial[key]
        tol = base_tol / scales[i] + 2e-7 * np.abs(initial[key]) + 1e-9  # + float32 rounding of w
        assert np.all(np.abs(got - mean) <= tol), key
        largest = max(largest, float(np.abs(mean).max()))
    assert largest > 100 * base_tol  # the updates are far above the tolerance: the check can fail
