"""SecAgg+ from the experiment YAML on a real SuperLink and three SuperNodes (127.0.0.1, TLS,
node authentication, warm workers): ``federation.secagg.enabled: true`` and nothing at the sites.
The run's one app bundle serves it: the ServerApp runs the SecAgg+ workflow and each site's
ClientApp routes its messages to the SecAgg+ client."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml

from common.federation import AGGREGATE_SITE
from server.state import ServerRunFolder

from .conftest import SITES, Federation, wait_until

# Same worker as tests/integration/test_deployment.py: one federation at a time on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0
ROUNDS = 2
STAGES = 4  # SecAgg+ train messages per round: setup, share keys, collect masked vectors, unmask


def test_secagg_from_yaml_completes_with_only_the_masked_sum_at_the_server(federation: Federation) -> None:
    fed = federation
    path = fed.write_experiment(rounds=ROUNDS, min_sites=3)
    doc = yaml.safe_load(path.read_text())
    doc["experiment"]["federation"]["secagg"] = {"enabled": True, "max_weight": 64, "clipping_range": 0.5}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    sites = {}
    for name in SITES:
        fed.write_site(name)  # the same site YAML as every other run: no SecAgg switch, warm worker on
        sites[name] = fed.site(name)
    assert server.wait(RUN_LIMIT) == 0, server.tail(60)

    status = fed.status()
    assert status["state"] == "finished" and status["round"] == ROUNDS, status
    assert "SecAgg+" in status["message"]
    final = ServerRunFolder(fed.run_dir).load(restore=False).state_dict
    assert all(torch.isfinite(v).all() for v in final.values())
    assert (fed.run_dir / "model.pt").is_file()

    rows = fed.metrics()
    updates = {int(r["round"]): float(r["value"]) for r in rows if r["metric"] == "secagg_updates"}
    assert updates == {rnd: 3.0 for rnd in range(1, ROUNDS + 1)}  # every site in every masked sum
    assert {r["site"] for r in rows} == {AGGREGATE_SITE}  # nothing per site reached the server
    assert {int(r["round"]) for r in rows if r["phase"] == "evaluate" and r["metric"] == "dice"} == {1, 2}

    log = (fed.run_dir / "server.log").read_text(errors="replace")
    assert log.count("Secure aggregation commencing") == ROUNDS
    assert log.count("Secure aggregation completed") == ROUNDS
    submitted = next(e for e in fed.audit() if e["event"] == "run_submitted")
    for name in SITES:  # each site ran the run's one bundle through the SecAgg+ stages
        tasks = [e for e in fed.site_audit(name) if e["event"] == "task"]
        kinds = Counter(e["message_type"] for e in tasks)
        assert kinds["train"] == STAGES * ROUNDS and kinds["evaluate"] == ROUNDS, kinds
        assert {e["fab_sha256"] for e in tasks} == {submitted["fab_sha256"]}
        assert all(e["outcome"] == "completed" for e in tasks)
        assert sites[name].alive
