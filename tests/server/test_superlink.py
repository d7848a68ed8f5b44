"""server/superlink.py: the SuperLink command line and the Flower configuration file."""
from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

from server.superlink import (
    LoopbackControlOnly,
    SuperLinkLaunch,
    is_loopback_client,
    write_flwr_config,
)


def test_flower_config(tmp_path: Path) -> None:
    path = write_flwr_config(tmp_path / "home", "127.0.0.1:9093", tmp_path / "ca.crt")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "fedbus"
    assert conf["superlink"]["fedbus"] == {"address": "127.0.0.1:9093",
                                           "root-certificates": str((tmp_path / "ca.crt").resolve())}
    insecure = tomllib.loads(write_flwr_config(tmp_path / "h2", "127.0.0.1:1", None).read_text())
    assert insecure["superlink"]["fedbus"]["insecure"] is True


def test_superlink_command_is_secure_by_default(tmp_path: Path) -> None:
    tls = SuperLinkLaunch("0.0.0.0", 9093, tmp_path / "s.db", tmp_path / "ca", tmp_path / "crt",
                          tmp_path / "key", exec_secret_file=tmp_path / "sec").command()
    assert "--enable-supernode-auth" in tls and "--insecure" not in tls
    assert "--disable-runtime-dependency-installation" in tls
    assert tls[tls.index("--isolation") + 1] == "process" and "--superexec-auth-secret-file" in tls
    plain = SuperLinkLaunch("127.0.0.1", 1, None, None, None, None, isolation="subprocess").command()
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain and "--database" not in plain
    assert SuperLinkLaunch("0.0.0.0", 9, None, None, None, None).local_address == "127.0.0.1:9"


def test_control_api_is_loopback_only_by_default(tmp_path: Path) -> None:
    cmd = SuperLinkLaunch("0.0.0.0", 9093, None, None, None, None).command()
    assert cmd[1:5] == ["-m", "server.superlink", "--control-loopback-only", "--"]
    both = SuperLinkLaunch("0.0.0.0", 1, None, None, None, None, memory_objects=True).command()
    assert both[3:6] == ["--memory-object-store", "--control-loopback-only", "--"]
    stock = SuperLinkLaunch("127.0.0.1", 1, None, None, None, None, control_loopback_only=False).command()
    assert stock[0].endswith("flower-superlink") and "--control-loopback-only" not in stock


def _call(path: str, client: tuple[str, int] | None) -> tuple[int, list[str]]:
    """(status sent, paths that reached the wrapped app) for one request through the filter."""
    reached: list[str] = []
    sent: list[dict] = []

    async def inner(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "client": client}
    asyncio.run(LoopbackControlOnly(inner)(scope, receive, send))
    return sent[0]["status"], reached


def test_control_requests_from_the_network_are_refused_before_flower_sees_them() -> None:
    assert _call("/v1/control/register-node", ("10.1.2.3", 5000)) == (403, [])
    assert _call("/v1/control/list-nodes", None) == (403, [])  # no client address: refused
    assert _call("/v1/control/register-node", ("127.0.0.1", 5000)) == (200, ["/v1/control/register-node"])
    assert _call("/v1/control/list-nodes", ("::ffff:127.0.0.1", 1)) == (200, ["/v1/control/list-nodes"])
    assert _call("/v1/fleet/pull-messages", ("10.1.2.3", 5000)) == (200, ["/v1/fleet/pull-messages"])
    assert [is_loopback_client(h) for h in ("::1", "127.8.0.1", "0.0.0.0", "localhost", "")] == [
        True, True, False, False, False]
