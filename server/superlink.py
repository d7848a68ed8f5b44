"""The coordinator's SuperLink: how to start it (``SuperLinkLaunch``), the Flower configuration
(FLWR_HOME/config.toml) that ``flwr run`` and ``flwr log`` need, and ``python -m server.superlink``
(the stock SuperLink main, optionally with payloads in memory, and by default with the Control
API answered for loopback clients only). Process supervision and the Flower environment are in
launch/ (shared with the sites' launcher).

Why a filter and not a second listener: in Flower 1.41 Fleet, Control and Runtime share one
HTTP server (``--host``/``--port``; ``--control-api-address`` is deprecated and ignored), and
the open-source Control API has no authentication, so anyone who reaches the port could
register a key. Sites need the Fleet API from the network; the Control API (register, revoke,
submit runs) is refused (403) to every client that is not on loopback. Operators elsewhere
reach it through an SSH tunnel (deploy/README.md).
"""
from __future__ import annotations

import ipaddress
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from launch.flwr_env import apply_flwr_env, toml_value
from launch.process import bin_path, connect_host

CONNECTION = "fedbus"  # connection name in our FLWR_HOME/config.toml
CONTROL_PREFIX = "/v1/control"  # the Control API's routes (flwr/superlink/routers/control)


def write_flwr_config(flwr_home: str | Path, address: str, ca_cert: str | Path | None,
                      connection: str = CONNECTION) -> Path:
    """Write FLWR_HOME/config.toml with one default connection to our SuperLink."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{connection}"', "", f"[superlink.{connection}]",
             f'address = "{address}"']
    if ca_cert is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(Path(ca_cert).resolve()))}")
    text = "\n".join(lines) + "\n"
    return atomic_write(home / "config.toml", lambda fh: fh.write(text), mode=None)


@dataclass(frozen=True)
class SuperLinkLaunch:
    """How to start one SuperLink. ``isolation="process"``: our own ServerApp executor
    (server/serverapp_exec.py) acquires the ServerApp task; "subprocess": stock SuperExec."""

    host: str
    port: int
    database: Path | None  # None: in-memory state (lost on restart; no --resume)
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None
    node_auth: bool = True
    isolation: str = "process"
    exec_secret_file: Path | None = None
    log_file: Path | None = None
    memory_objects: bool = False  # our entry point: payloads in memory, state in --database
    control_loopback_only: bool = True  # our entry point: Control API refused to non-loopback clients

    def command(self) -> list[str]:
        ours = [flag for flag, on in (("--memory-object-store", self.memory_objects),
                                      ("--control-loopback-only", self.control_loopback_only)) if on]
        if ours:
            cmd = [sys.executable, "-m", "server.superlink", *ours, "--"]
        else:
            cmd = [bin_path("flower-superlink")]
        cmd += ["--host", self.host, "--port", str(self.port),
                "--isolation", self.isolation, "--disable-runtime-dependency-installation"]
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        if self.ca_cert is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                    "--ssl-keyfile", str(self.server_key)]
            if self.node_auth:
                cmd.append("--enable-supernode-auth")
        if self.isolation == "process" and self.exec_secret_file is not None:
            cmd += ["--superexec-auth-secret-file", str(self.exec_secret_file)]
        if self.log_file is not None:
            cmd += ["--log-file", str(self.log_file)]
        return cmd

    @property
    def local_address(self) -> str:
        return f"{connect_host(self.host)}:{self.port}"


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def is_loopback_client(host: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 (also IPv4-mapped); False for anything else or no address."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


class LoopbackControlOnly:
    """ASGI middleware: requests under ``/v1/control`` from a non-loopback client get 403
    before any Flower handler runs; everything else (Fleet, Runtime, health) passes. The
    client address is uvicorn's, i.e. X-Forwarded-For only when sent from 127.0.0.1."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        client = scope.get("client") or (None, None)
        if (scope.get("type") == "http" and str(scope.get("path", "")).startswith(CONTROL_PREFIX)
                and not is_loopback_client(client[0])):
            body = b"Control API: loopback clients only (reach it through an SSH tunnel)\n"
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def patch_control_loopback_only() -> None:
    """Put ``LoopbackControlOnly`` outermost in the SuperLink app's middleware stack."""
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    original = superlink_main._get_middleware

    def middleware() -> list[Middleware]:
        return [Middleware(LoopbackControlOnly), *original()]

    superlink_main._get_middleware = middleware  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m server.superlink [--memory-object-store] [--control-loopback-only] --
    <flower-superlink args>``: the stock SuperLink main, optionally with payloads kept in memory
    (launch/flwr_tuning.py) and the Control API for loopback clients only."""
    import argparse

    p = argparse.ArgumentParser(prog="server.superlink")
    p.add_argument("--memory-object-store", action="store_true")
    p.add_argument("--control-loopback-only", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    apply_flwr_env()
    from launch.flwr_tuning import configure_flwr_logging, patch_superlink_object_store

    configure_flwr_logging()
    if args.memory_object_store:
        patch_superlink_object_store()
    if args.control_loopback_only:
        patch_control_loopback_only()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
