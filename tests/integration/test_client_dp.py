"""Client-level DP from the experiment YAML on a real SuperLink and three SuperNodes (127.0.0.1,
TLS, node authentication, warm workers): ``federation.client_dp.mode: client-fixed`` and nothing
at the sites. The sites clip (client/client_dp.py, switched on by the round's config), the server
clips again and adds noise σ·C/3 to the mean; each round records σ, C and ε."""
from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from common.clipping import is_counter
from common.device import seed_everything
from common.federation import AGGREGATE_SITE, build_experiment_model, load_run_spec
from server.state import ServerRunFolder

from .conftest import SITES, Federation, wait_until

# Same worker as tests/integration/test_deployment.py: one federation at a time on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0
SIGMA, CLIP, ROUNDS = 1.0, 0.05, 2


def test_client_level_dp_from_yaml_clips_at_the_sites_and_noises_the_mean(federation: Federation) -> None:
    fed = federation
    path = fed.write_experiment(rounds=ROUNDS, min_sites=3)
    doc = yaml.safe_load(path.read_text())
    doc["experiment"]["federation"].update(
        packed_weights=False, client_dp={"mode": "client-fixed", "noise_multiplier": SIGMA, "clipping_norm": CLIP})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    sites = {}
    for name in SITES:
        fed.write_site(name)  # the same site YAML as every other run: no DP switch at the sites
        sites[name] = fed.site(name)
    assert server.wait(RUN_LIMIT) == 0, server.tail(60)

    status = fed.status()
    assert status["state"] == "finished" and status["round"] == ROUNDS
    final = ServerRunFolder(fed.run_dir).load(restore=False).state_dict
    assert all(torch.isfinite(v).all() for v in final.values())

    rows = [r for r in fed.metrics() if r["site"] == AGGREGATE_SITE and r["metric"].startswith("client_dp_")]
    got = {(int(r["round"]), r["metric"]): float(r["value"]) for r in rows}
    for rnd in range(1, ROUNDS + 1):
        assert got[(rnd, "client_dp_noise_multiplier")] == SIGMA
        assert got[(rnd, "client_dp_clipping_norm")] == CLIP
        assert got[(rnd, "client_dp_noise_std")] == pytest.approx(SIGMA * CLIP / 3)
        assert got[(rnd, "client_dp_updates")] == 3.0
    assert 0 < got[(1, "client_dp_epsilon")] < got[(2, "client_dp_epsilon")] < math.inf

    # noise was added: a mean of updates clipped to C moves the model by at most C per round, the
    # noise (stdev σC/3 on each of ~2000 values) by far more
    spec = load_run_spec(fed.root / "experiment.yaml")
    seed_everything(spec.experiment.train.seed)  # the server's initial weights (server/app.py)
    initial = build_experiment_model(spec.experiment).state_dict()
    moved = math.sqrt(sum(float(((final[k] - initial[k]) ** 2).sum()) for k in initial
                          if not is_counter(k)))  # the step counter is not clipped (common/clipping.py)
    assert moved > 4 * ROUNDS * CLIP, moved

    for name in SITES:  # each site clipped its own update, asked by the round, not by its YAML
        log = (fed.root / "sites" / name / "logs" / "worker.log").read_text(errors="replace")
        clipped = re.findall(rf"client-level DP: update clipped to norm {CLIP:g} \(its norm was ([0-9.e+-]+)\)", log)
        assert len(clipped) == ROUNDS, (name, clipped)  # once per train message
        assert all(float(n) > CLIP for n in clipped)  # the clipping bit: raw updates were larger
        assert sites[name].alive
