"""The production path end to end on 127.0.0.1: flower-server (SuperLink + ServerApp) and
flower-client (SuperNode + warm worker) with TLS and SuperNode authentication, synthetic data
and a tiny model (32 px, 4 base channels, depth 2, 16 images per site)."""
from __future__ import annotations

import shutil
import signal
from collections import Counter

import pytest

from common.modelfile import read_model
from launch.audit import verify
from server.state import ServerRunFolder

from .conftest import SITES, Federation, kill_tree, wait_until

# One worker runs these one after another under pytest -n: each starts a SuperLink and three
# SuperNodes, and two such federations at once only contend for the same two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0  # seconds for a whole run: generous (shared 2-core CI machines), but bounded


def _start(fed: Federation, *, rounds: int = 2, min_sites: int = 3, database: str | None = None,
           **spec: float):
    fed.write_experiment(rounds=rounds, min_sites=min_sites, **spec)
    fed.write_coordinator(**({"database": database} if database else {}))
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    sites = {}
    for name in SITES:
        fed.write_site(name)
        sites[name] = fed.site(name)
    return server, sites


def test_three_sites_complete_a_run_with_tls_and_authentication(federation: Federation) -> None:
    fed = federation
    server, sites = _start(fed)
    code = server.wait(RUN_LIMIT)
    assert code == 0, server.tail(60)

    resumed = ServerRunFolder(fed.run_dir).load(restore=False)
    assert resumed.round == 2
    rows = fed.metrics()
    evaluated = {(int(r["round"]), r["site"]) for r in rows if r["phase"] == "evaluate" and r["metric"] == "dice"}
    assert {(rnd, s) for rnd in (1, 2) for s in SITES} <= evaluated
    trained = {(int(r["round"]), r["site"]) for r in rows if r["phase"] == "train" and r["metric"] == "num-examples"}
    assert {(rnd, s) for rnd in (1, 2) for s in SITES} <= trained
    assert not [r for r in rows if r["metric"] == "failed"]

    audit = fed.audit()
    assert verify(fed.root / "coordinator" / "audit.jsonl") == []
    events = Counter(e["event"] for e in audit)
    assert events["site_registered"] == 3 and events["run_submitted"] == 1
    submitted = next(e for e in audit if e["event"] == "run_submitted")
    assert len(submitted["fab_sha256"]) == 64
    assert {e["site"] for e in audit if e["event"] == "site_online"} == set(SITES)
    assert [e["round"] for e in audit if e["event"] == "round_completed"] == [1, 2]
    finished = next(e for e in audit if e["event"] == "run_finished")
    assert finished["sub_status"] == "completed" and finished["folder_state"] == "finished"
    for name in SITES:  # every site ran the coordinator's app bundle, and logged which one
        tasks = [e for e in fed.site_audit(name) if e["event"] == "task"]
        assert {e["message_type"] for e in tasks} >= {"train", "evaluate"}
        assert {e["fab_sha256"] for e in tasks} == {submitted["fab_sha256"]}
        assert all(e["outcome"] == "completed" for e in tasks)
        assert sites[name].alive  # sites outlive a run

    # what the operator and the hospitals use: a report with plots, a model file and its card
    run = fed.run_dir
    assert "round 2" in (run / "report.md").read_text().lower()
    assert (run / "report_dice.png").stat().st_size > 0
    _, meta = read_model(run / "model.pt")  # digests verified
    assert meta["temperature"] > 0 and meta["calibration"]  # fitted from the sites' NLL sums
    card = (run / "model.card.md").read_text()
    assert "not a diagnostic device" in card.lower()


def test_unregistered_and_plaintext_sites_are_refused(federation: Federation) -> None:
    fed = federation
    fed.write_experiment(rounds=1, min_sites=3, quorum_timeout_s=120)
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))

    fed.write_site("intruder", reconnect_timeout_s=20)  # a valid key nobody registered
    intruder = fed.site("intruder")
    assert intruder.wait(90) not in (None, 0), intruder.tail()
    superlink_log = (fed.root / "coordinator" / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log

    fed.write_site("udiat", reconnect_timeout_s=15, insecure=True, ca_cert=None, private_key=None)
    plaintext = fed.site("udiat")
    assert plaintext.wait(90) not in (None, 0), plaintext.tail()
    assert "udiat" not in {e.get("site") for e in fed.audit() if e["event"] == "site_online"}

    server.signal_group(signal.SIGTERM)  # clean stop while waiting for a quorum
    assert server.wait(60) == 3, server.tail(40)
    assert [e["event"] for e in fed.audit()][-1] == "coordinator_stop"
    assert verify(fed.root / "coordinator" / "audit.jsonl") == []


def test_a_site_killed_mid_round_is_reported_and_the_run_completes(federation: Federation) -> None:
    fed = federation
    # SuperLink state in memory here (faster); the other runs use the default SQLite file.
    server, sites = _start(fed, rounds=2, min_sites=2, round_timeout_s=240, quorum_timeout_s=60,
                           database=":memory:")
    wait_until(lambda: any(r["round"] == "1" for r in fed.metrics()), RUN_LIMIT, "round 1",
               procs=(server, *sites.values()))
    kill_tree(sites["bus-uclm"])  # hard crash while round 2 is in flight
    code = server.wait(RUN_LIMIT)
    assert code == 0, server.tail(60)
    failed = {(int(r["round"]), r["phase"], r["site"]) for r in fed.metrics() if r["metric"] == "failed"}
    assert failed and {s for _, _, s in failed} == {"bus-uclm"}
    assert {e["site"] for e in fed.audit() if e["event"] == "site_failure"} == {"bus-uclm"}
    assert ServerRunFolder(fed.run_dir).load(restore=False).round == 2
    last = [r for r in fed.metrics() if r["round"] == "2" and r["phase"] == "evaluate" and r["metric"] == "dice"]
    assert {r["site"] for r in last} >= {"udiat", "busi"}


def test_coordinator_killed_after_round_one_resumes_to_the_end(federation: Federation) -> None:
    fed = federation
    server, sites = _start(fed, rounds=2)
    checkpoint = fed.run_dir / "checkpoint.pt"
    wait_until(lambda: fed.status().get("round") == 1 and checkpoint.exists(), RUN_LIMIT, "round 1 checkpoint",
               procs=(server, *sites.values()))
    kill_tree(server)
    first = ServerRunFolder(fed.run_dir).load(restore=False)
    shutil.copy(checkpoint, fed.root / "round1.pt")
    if first.round == 2:
        pytest.skip("round 2 finished before the kill landed; nothing to resume")

    resumed = fed.server("--resume", name="flower-server-resume")
    code = resumed.wait(RUN_LIMIT)
    assert code == 0, resumed.tail(60)
    final = ServerRunFolder(fed.run_dir).load(restore=False)
    assert final.round == 2 and final.run_key == first.run_key
    rows = fed.metrics()
    per_round = Counter((r["round"], r["phase"], r["site"], r["metric"]) for r in rows)
    assert max(per_round.values()) == 1  # round 1 is not counted twice
    assert {r["round"] for r in rows} == {"1", "2"}
    submitted = [e for e in fed.audit() if e["event"] == "run_submitted"]
    assert [e["resume"] for e in submitted] == [False, True]
    assert [e["round"] for e in fed.audit() if e["event"] == "round_completed"][-1] == 2
    assert fed.status()["state"] == "finished"
