"""flower-client's supervision once a run has ended (client/cli.py with client/run_status.py):
exit 0 with ``after_run: exit``; with ``wait``, stop the SuperNode while the coordinator is gone
and start it again when the coordinator answers. The SuperNode is a stand-in process."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from client.site_process import Site
from client.run_status import write_run_status
from client.site_config import site_config_from_dict
from launch.audit import read


def _site(tmp_path: Path, after_run: str) -> Site:
    cfg = site_config_from_dict({"site": "udiat", "insecure": True, "after_run": after_run,
                                 "data": {"synthetic_centre": "BUSI"}, "state_dir": str(tmp_path),
                                 "tuning": {"fast": False}}, "test")
    site = Site(cfg, echo=False)
    site.supernode_cmd = ["sleep", "60"]  # stands in for the SuperNode
    site.start_supernode()
    return site


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_exit_after_the_run_ends(tmp_path: Path) -> None:
    site = _site(tmp_path, "exit")
    site.after_run.exit_grace_s = 0.2
    write_run_status(tmp_path, 5, "running")
    stop: list[str] = []
    timer = threading.Timer(30.0, lambda: stop.append("test timeout"))
    timer.start()
    try:
        write_run_status(tmp_path, 5, "finished")
        assert site.supervise(stop) == 0 and not stop
    finally:
        timer.cancel()
        site.stop()


def test_wait_pauses_while_the_coordinator_is_gone_and_rejoins(tmp_path: Path) -> None:
    site = _site(tmp_path, "wait")
    up = [False]
    site.after_run.reachable = lambda: up[0]
    site.after_run.gone_s, site.after_run.probe_s = 0.5, 0.1
    first = site.supernode
    stop: list[str] = []
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(site.supervise(stop)))
    runner.start()
    try:
        write_run_status(tmp_path, 5, "finished")
        assert _until(lambda: site.after_run.paused and not first.alive)
        up[0] = True
        assert _until(lambda: site.supernode is not first and site.supernode.alive)
        assert not site.after_run.paused
    finally:
        stop.append("test")
        runner.join(10.0)
        site.stop()
    assert result == [0]
    events = [e["event"] for e in read(tmp_path / "audit.jsonl")]
    assert events == ["site_paused", "site_resumed"]
