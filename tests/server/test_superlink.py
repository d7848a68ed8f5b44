"""server/superlink.py: process groups, bounded health waits, Flower config, log echo, patches."""
from __future__ import annotations

import io
import os
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.superlink import (
    FLWR_ENV, LogFollower, ManagedProcess, ProcessError, SuperLinkLaunch,
    connect_host, flwr_env, free_port, toml_value, wait_for_health, write_flwr_config,
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


def test_flower_config_and_environment(tmp_path: Path) -> None:
    path = write_flwr_config(tmp_path / "home", "127.0.0.1:9093", tmp_path / "ca.crt")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "fedbus"
    assert conf["superlink"]["fedbus"] == {"address": "127.0.0.1:9093",
                                           "root-certificates": str((tmp_path / "ca.crt").resolve())}
    insecure = tomllib.loads(write_flwr_config(tmp_path / "h2", "127.0.0.1:1", None).read_text())
    assert insecure["superlink"]["fedbus"]["insecure"] is True
    env = flwr_env(tmp_path / "home")
    assert all(env[k] == v for k, v in FLWR_ENV.items()) and env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert toml_value('a "b" \\c') == '"a \\"b\\" \\\\c"' and toml_value(True) == "true"


def test_superlink_command_is_secure_by_default(tmp_path: Path) -> None:
    tls = SuperLinkLaunch("0.0.0.0", 9093, tmp_path / "s.db", tmp_path / "ca", tmp_path / "crt",
                          tmp_path / "key", exec_secret_file=tmp_path / "sec").command()
    assert "--enable-supernode-auth" in tls and "--insecure" not in tls
    assert "--disable-runtime-dependency-installation" in tls
    assert tls[tls.index("--isolation") + 1] == "process" and "--superexec-auth-secret-file" in tls
    plain = SuperLinkLaunch("127.0.0.1", 1, None, None, None, None, isolation="subprocess").command()
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain and "--database" not in plain
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("10.1.2.3") == "10.1.2.3"


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
