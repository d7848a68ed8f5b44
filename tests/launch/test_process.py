"""launch/process.py: process groups, bounded health waits, log echo."""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest

from launch.process import (
    LogFollower, ManagedProcess, ProcessError, connect_host, coordinator_reachable, ensure_secret, free_port,
    wait_for_health,
)

HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_stop_reaches_grandchildren(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    proc = ManagedProcess("tree", ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                          tmp_path / "tree.log").start()
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert _alive(grandchild)
    proc.stop(timeout=5.0)
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild) and not proc.alive
    assert "start tree" in (tmp_path / "tree.log").read_text()


def test_wait_for_health_succeeds_and_is_bounded(tmp_path: Path) -> None:
    port = free_port()
    server = ManagedProcess("health", [sys.executable, "-c", HEALTH_SERVER, str(port)],
                            tmp_path / "h.log").start()
    try:
        assert wait_for_health(f"127.0.0.1:{port}", None, timeout=20.0, proc=server) >= 0.0
    finally:
        server.stop(2.0)
    t0 = time.monotonic()
    with pytest.raises(ProcessError, match="not healthy after 1s"):
        wait_for_health(f"127.0.0.1:{free_port()}", None, timeout=1.0)
    assert time.monotonic() - t0 < 10.0


def test_wait_for_health_reports_a_dead_process(tmp_path: Path) -> None:
    proc = ManagedProcess("dies", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                          tmp_path / "d.log").start()
    with pytest.raises(ProcessError, match=r"exited with code 3[\s\S]*boom"):
        wait_for_health(f"127.0.0.1:{free_port()}", None, timeout=30.0, proc=proc)


def test_log_follower_prefixes_complete_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("old line\n")
    out = io.StringIO()
    follower = LogFollower(out)
    follower.add(log, "site-a")  # from the end: 'old line' is not echoed
    with log.open("a") as fh:
        fh.write("one\ntwo (unfinished")
    follower.poll()
    assert out.getvalue() == "[site-a] one\n"
    with log.open("a") as fh:
        fh.write(")\n")
    follower.poll()
    assert out.getvalue() == "[site-a] one\n[site-a] two (unfinished)\n"


def test_ensure_secret_is_private_and_kept(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path / "state" / "superexec.secret")
    first = path.read_bytes()
    assert len(first) == 64 and int(first, 16) >= 0  # 32 random bytes, hex
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_secret(path).read_bytes() == first  # never rotated behind a running SuperLink


def test_connect_host_maps_bind_all_to_loopback() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::") == "::1"
    assert connect_host("10.1.2.3") == "10.1.2.3"


STATUS_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(sys.argv[2])); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.parametrize("status, reachable", [(200, True), (404, True), (502, False)])
def test_coordinator_reachable_counts_answers_below_500(tmp_path: Path, status: int, reachable: bool) -> None:
    port = free_port()  # 404: a proxy in front of the SuperLink; 502: the proxy's SuperLink is down
    server = ManagedProcess("status", [sys.executable, "-c", STATUS_SERVER, str(port), str(status)],
                            tmp_path / "s.log").start()
    try:
        assert _eventually(lambda: _listening(port))
        assert coordinator_reachable(f"127.0.0.1:{port}", None) == reachable
    finally:
        server.stop(2.0)
    assert not coordinator_reachable(f"127.0.0.1:{port}", None, timeout=2.0)  # refused


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _eventually(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
