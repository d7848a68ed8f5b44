"""Sites learn that the run is over (server/run_end.py, client/run_status.py) on a real
SuperLink: a one-round run, one site set to exit afterwards, one to wait with a short bound on
how long the coordinator may be gone before its SuperNode is stopped."""
from __future__ import annotations

import time

import pytest

from .conftest import SITES, Federation, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.xdist_group("deployment")]


def test_sites_hear_the_run_end_then_exit_or_wait_quietly(federation: Federation) -> None:
    fed = federation
    fed.write_experiment(rounds=1, min_sites=3)
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    exiting, waiting, plain = SITES
    fed.write_site(exiting, after_run="exit")
    fed.write_site(waiting, tuning={"heartbeat_s": 10.0, "reconnect_timeout_s": 120.0,
                                    "coordinator_gone_s": 2.0, "coordinator_probe_s": 1.0})
    fed.write_site(plain)
    sites = {name: fed.site(name) for name in SITES}
    assert server.wait(300) == 0, server.tail(60)

    assert sites[exiting].wait(60) == 0, sites[exiting].tail(30)  # after_run: exit
    out = sites[exiting].tail(200)
    assert "finished; exiting (after_run: exit)" in out

    def paused() -> bool:
        return any(e["event"] == "site_paused" for e in fed.site_audit(waiting))

    wait_until(paused, 60, "the waiting site to stop its SuperNode", procs=(sites[waiting],))
    for name in (waiting, plain):
        assert sites[name].alive
        text = sites[name].tail(400)
        assert text.count("finished; waiting for the next run") == 1, text
    out_file = fed.root / f"site-{waiting}.out"
    before = out_file.read_text(errors="replace").count("Connection attempt failed")
    time.sleep(5)  # paused: no reconnect warnings any more
    assert out_file.read_text(errors="replace").count("Connection attempt failed") == before
