"""A hospital's own terms hold on a real SuperLink (127.0.0.1, TLS, node authentication, warm
workers), in one two-round DP-SGD run whose coordinator asks for ``target_epsilon: 50``:

- udiat's site YAML says ``privacy: {max_epsilon: 3}``: it trains both rounds and its ε (the
  run's metrics and its own accountant file) stays within 3, while bus-uclm, without terms,
  spends far more;
- busi reads a real manifest folder (32-px PNGs). Its node answers the coordinator's site query
  (the warm worker has then read and cached its tensors), then 6 of its 12 cases are withdrawn
  (files and manifest rows) before the other sites connect, so before round 1 can start: every
  round's ``num-examples`` is the count of what is left, never the count it declared at join.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from common.data.synthetic import make_centre
from common.federation import SiteSpec, load_run_spec
from common.sitedata import load_site_tensors

from .conftest import SITES, Federation, wait_until

# Same worker as tests/integration/test_deployment.py: one federation at a time on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0
ROUNDS, ASKED, CAP = 2, 50.0, 3.0
CAPPED, WITHDRAWING, FREE = "udiat", "busi", "bus-uclm"
CASES, WITHDRAWN = 12, 6


def write_manifest_site(root: Path, n: int) -> Path:
    """``n`` synthetic 32-px cases as PNG image + mask files listed in ``root/manifest.csv``."""
    root.mkdir(parents=True)
    rows = ["image,mask,label,patient_id"]
    for case in make_centre("SynEG", n, size=32, seed=1):
        name, mask = case.case_id, ""
        Image.fromarray(case.image).save(root / f"{name}.png")
        if case.mask.any():  # a normal image has no mask file (empty cell)
            mask = f"{name}_mask.png"
            Image.fromarray(case.mask.astype(np.uint8) * 255).save(root / mask)
        rows.append(f"{name}.png,{mask},{case.label.name.lower()},{case.patient_id}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def withdraw_last(root: Path, k: int) -> None:
    """The hospital withdraws its last ``k`` cases: files deleted, manifest rows removed."""
    lines = (root / "manifest.csv").read_text().splitlines()
    for line in lines[-k:]:
        for cell in line.split(",")[:2]:
            if cell:
                (root / cell).unlink()
    (root / "manifest.csv").write_text("\n".join(lines[:-k]) + "\n")


def test_site_epsilon_cap_and_withdrawn_cases_hold_in_a_real_run(federation: Federation, tmp_path: Path) -> None:
    fed = federation
    path = fed.write_experiment(rounds=ROUNDS, min_sites=3)
    doc = yaml.safe_load(path.read_text())
    doc["experiment"]["privacy"] = {"enabled": True, "target_epsilon": ASKED, "planned_epochs": ROUNDS}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))

    # busi joins alone (3 sites are needed, so no round starts): the coordinator's query makes its
    # warm worker read and cache its 12 cases
    data = write_manifest_site(tmp_path / "busi-data", CASES)
    fed.write_site(WITHDRAWING, data={"path": str(data), "format": "manifest"},
                   cache_dir=str(tmp_path / "busi-cache"))
    busi = fed.site(WITHDRAWING)
    server_log = fed.run_dir / "server.log"
    joined = re.compile(rf"site {WITHDRAWING} joined \(node \d+\): (\d+) training")
    found = wait_until(lambda: server_log.exists() and joined.search(server_log.read_text()), 240,
                       f"{WITHDRAWING} to join", procs=(server, busi))
    declared = int(found.group(1))
    cache = tmp_path / "busi-cache"
    stale = {f.name for f in cache.glob(f"{WITHDRAWING}-train-*.pt")}
    assert len(stale) == 1  # the 12 cases' training tensors, cached on disk (and in the worker)

    spec = load_run_spec(fed.root / "experiment.yaml")
    site = SiteSpec(name=WITHDRAWING, data_path=str(data), data_format="manifest")
    assert declared == len(load_site_tensors(site, spec.experiment.data)[0])  # all 12 cases' split
    withdraw_last(data, WITHDRAWN)
    left = len(load_site_tensors(site, spec.experiment.data)[0])
    assert 0 < left < declared

    fed.write_site(CAPPED, privacy={"max_epsilon": CAP})
    fed.write_site(FREE)
    procs = {WITHDRAWING: busi, CAPPED: fed.site(CAPPED), FREE: fed.site(FREE)}
    assert server.wait(RUN_LIMIT) == 0, server.tail(60)
    assert fed.status()["state"] == "finished"

    rows = fed.metrics()
    train = {(int(r["round"]), r["site"], r["metric"]): float(r["value"]) for r in rows if r["phase"] == "train"}
    assert not [r for r in rows if r["metric"] in ("failed", "rejected")]

    # withdrawn cases are not trained on: every round counts what is left (in the reply and in
    # the site's own log), although the worker had cached all 12 before the withdrawal
    assert [train[(rnd, WITHDRAWING, "num-examples")] for rnd in range(1, ROUNDS + 1)] == [left] * ROUNDS
    worker_log = (fed.root / "sites" / WITHDRAWING / "logs" / "worker.log").read_text(errors="replace")
    assert re.findall(rf"site {WITHDRAWING} round \d+: trained on (\d+) images", worker_log) == [str(left)] * ROUNDS
    fresh = {f.name for f in cache.glob(f"{WITHDRAWING}-train-*.pt")}
    assert len(fresh) == 1 and not fresh & stale  # the old entry was never served, and is gone

    # the site's ε cap holds against the coordinator's 50; a site without terms spends more
    eps = {s: [train[(rnd, s, "epsilon")] for rnd in range(1, ROUNDS + 1)] for s in SITES}
    assert 0 < eps[CAPPED][0] < eps[CAPPED][1] <= CAP  # it trained every round, within its cap
    assert eps[FREE][1] > 3 * CAP
    ledger = json.loads((fed.root / "sites" / CAPPED / "privacy" / "accountant.json").read_text())
    assert ledger["epsilon"] == pytest.approx(eps[CAPPED][1], rel=1e-6) and ledger["epsilon"] <= CAP
    capped_log = (fed.root / "sites" / CAPPED / "logs" / "worker.log").read_text(errors="replace")
    assert f"the coordinator asks for eps {ASKED}; the site allows at most {CAP:g}, which is the budget" in capped_log
    assert all(p.alive for p in procs.values())  # sites outlive a run
