"""Site identity bound to its key on a real SuperLink: a site whose YAML says ``busi`` but which
holds udiat's registered key is refused by name; the honest sites complete the run."""
from __future__ import annotations

import pytest

from launch.audit import verify
from launch.process import ManagedProcess, bin_path

from .conftest import Federation, wait_until

# Same worker as tests/integration/test_deployment.py: one federation at a time on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group("deployment")]
RUN_LIMIT = 600.0


def test_a_site_claiming_another_sites_name_with_its_own_key_is_refused(federation: Federation) -> None:
    fed = federation
    fed.write_experiment(rounds=1, min_sites=2)
    fed.write_coordinator()
    server = fed.server()
    wait_until(fed.registered, 90, "site registration", procs=(server,))
    # the impostor: udiat's key, a site YAML that says busi (own state folder and file name)
    path = fed.write_site("busi", key="udiat", state_dir=str(fed.root / "sites" / "impostor"))
    config = path.rename(fed.root / "site-impostor.yaml")
    impostor = ManagedProcess("site-impostor", [bin_path("flower-client"), "--site", "busi", "--config", str(config)],
                              fed.root / "site-impostor.out", env=fed.env).start()
    fed.procs.append(impostor)
    wait_until(lambda: any(e["event"] == "site_online" and e.get("site") == "udiat" for e in fed.audit()),
               120, "the impostor online", procs=(server, impostor))
    for name in ("busi", "bus-uclm"):
        fed.write_site(name)
        fed.site(name)
    code = server.wait(RUN_LIMIT)
    assert code == 0, server.tail(60)
    rows = fed.metrics()
    assert {r["site"] for r in rows if r["phase"] == "join"} == {"udiat"}
    assert {r["metric"] for r in rows if r["phase"] == "join"} == {"identity_refused"}
    assert {r["site"] for r in rows if r["phase"] == "train" and r["metric"] == "num-examples"} >= {"busi", "bus-uclm"}
    refused = [e for e in fed.audit() if e["event"] == "site_identity_refused"]
    assert [(e["claimed"], e["registered"]) for e in refused] == [("busi", "udiat")]
    assert refused[0]["node_id"] == next(e["node_id"] for e in fed.audit()
                                         if e["event"] == "site_registered" and e["site"] == "udiat")
    assert verify(fed.root / "coordinator" / "audit.jsonl") == []
    assert "claims site 'busi' but its key is registered as 'udiat': refused" in \
        (fed.run_dir / "server.log").read_text()
