"""Update screening on a real SuperLink: three authenticated SuperNodes on 127.0.0.1, one of
them (bus-uclm) a registered site whose worker runs a modified ClientApp
(tests/integration/hostile_app.py: round 1 NaN weights, round 2 weights of 1e30, round 3 noise
x10 claiming 1e9 examples). Each poisoned update must be rejected by site name and reason, in
the metrics and in the coordinator's audit log, the site dropped after its third rejection, and
the global model must be the honest-only aggregate, computed here again in-process (the same
spec and seeds, the two honest sites' configs, the hostile site absent)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from client.site_config import load_site_config
from common.federation import AGGREGATE_SITE, load_run_spec
from common.sitedata import clear_memo
from launch.audit import verify
from launch.process import ManagedProcess
from server.app import run_federation
from server.state import ServerRunFolder
from tests.server.local_grid import LocalGrid, task_identity

from .conftest import REPO, SITES, Federation, wait_until
from .hostile_app import CLAIMED_EXAMPLES, MODES
from .hostile_site import HOSTILE_APP

# Same worker as tests/integration/test_deployment.py: one federation at a time on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0
HOSTILE = "bus-uclm"
ROUNDS = 3
#: Reason codes (common/screening.py CHECKS) each round's poison must trip.
EXPECTED_CODES = {1: {"non-finite"}, 2: {"norm"}, 3: {"num-examples", "norm"}}


def honest_reference(fed: Federation, out: Path) -> dict[str, torch.Tensor]:
    """The global model of the same run with the hostile site absent: the coordinator's spec
    and the honest sites' node configs, run in-process (each site its own state folder)."""
    spec = load_run_spec(fed.root / "experiment.yaml")
    spec = dataclasses.replace(spec, run_dir=str(out / "run"),
                               federation=dataclasses.replace(spec.federation, min_sites=len(SITES) - 1))
    nodes = {}
    for i, name in enumerate(n for n in SITES if n != HOSTILE):
        cfg = load_site_config(fed.root / f"site-{name}.yaml")
        nodes[100 + i] = {**cfg.node_config(), "state-dir": str(out / "sites" / name)}
    clear_memo()
    with task_identity():
        run_federation(LocalGrid(client_app, nodes), spec)
    return ServerRunFolder(spec.run_dir).load(restore=False).state_dict


def test_poisoned_updates_are_rejected_by_name_and_the_model_is_the_honest_aggregate(
        federation: Federation, tmp_path: Path) -> None:
    assert set(MODES) == set(EXPECTED_CODES) == set(range(1, ROUNDS + 1))
    fed = federation
    fed.write_experiment(rounds=ROUNDS, min_sites=len(SITES))  # drop_after_rejections: the default 3
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    for name in SITES:
        config = fed.write_site(name)
        if name != HOSTILE:
            fed.site(name)
            continue
        hostile = ManagedProcess(f"site-{name}", [sys.executable, "-m", "tests.integration.hostile_site",
                                                  "--site", name, "--config", str(config)],
                                 fed.root / f"site-{name}.out", env=fed.env, cwd=REPO).start()
        fed.procs.append(hostile)
    code = server.wait(RUN_LIMIT)
    assert code == 0, server.tail(60)
    assert fed.status()["state"] == "finished"
    starts = [e for e in fed.site_audit(HOSTILE) if e["event"] == "worker_start"]
    assert starts and {e["app"] for e in starts} == {HOSTILE_APP}  # the hostile code really ran

    # metrics: rejected by name, for the expected reasons, every round; dropped after round 3
    rows = fed.metrics()
    codes: dict[int, set[str]] = {}
    for r in rows:
        if r["metric"].startswith("rejected_"):
            assert r["site"] == HOSTILE, r
            codes.setdefault(int(r["round"]), set()).add(r["metric"].removeprefix("rejected_"))
    assert codes == EXPECTED_CODES
    assert {(int(r["round"]), r["site"]) for r in rows if r["metric"] == "dropped"} == {(ROUNDS, HOSTILE)}
    trained = {(int(r["round"]), r["site"]) for r in rows
               if r["phase"] == "train" and r["metric"] == "num-examples" and r["site"] != AGGREGATE_SITE}
    assert trained == {(rnd, s) for rnd in range(1, ROUNDS + 1) for s in SITES if s != HOSTILE}
    assert not [r for r in rows if r["metric"] == "failed"]

    # the coordinator's audit log: one entry per rejection and the drop, with round and reason
    audit = fed.audit()
    assert verify(fed.root / "coordinator" / "audit.jsonl") == []
    rejected = [e for e in audit if e["event"] == "update_rejected"]
    assert [(e["round"], e["site"]) for e in rejected] == [(rnd, HOSTILE) for rnd in range(1, ROUNDS + 1)]
    assert rejected[0]["reason"].startswith("non-finite values in")
    assert "exceeds 10 × the round's median" in rejected[1]["reason"]
    assert f"num-examples {CLAIMED_EXAMPLES} exceeds the" in rejected[2]["reason"]
    dropped = [e for e in audit if e["event"] == "site_dropped"]
    assert [(e["round"], e["site"]) for e in dropped] == [(ROUNDS, HOSTILE)]
    assert {e["actor"] for e in rejected + dropped} == {"serverapp"}

    # the global model: finite and the honest-only aggregate
    final = ServerRunFolder(fed.run_dir).load(restore=False)
    assert final.round == ROUNDS
    weights = final.state_dict
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    reference = honest_reference(fed, tmp_path / "reference")
    assert set(reference) == set(weights)
    diff = torch.sqrt(sum(((weights[k].double() - reference[k].double()) ** 2).sum() for k in weights))
    norm = torch.sqrt(sum((reference[k].double() ** 2).sum() for k in weights))
    assert float(diff / norm) <= 1e-3, f"relative difference to the honest aggregate {float(diff / norm):.3g}"
