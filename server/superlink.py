"""The coordinator's SuperLink: how to start it (``SuperLinkLaunch``), the Flower configuration
(FLWR_HOME/config.toml) that ``flwr run`` and ``flwr log`` need, and ``python -m server.superlink``
(the stock SuperLink main, optionally with payloads in memory). Process supervision and the
Flower environment are in launch/ (shared with the sites' launcher).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.atomic import atomic_write
from launch.flwr_env import apply_flwr_env, toml_value
from launch.process import bin_path, connect_host

CONNECTION = "fedbus"  # connection name in our FLWR_HOME/config.toml


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

    def command(self) -> list[str]:
        if self.memory_objects:
            cmd = [sys.executable, "-m", "server.superlink", "--memory-object-store", "--"]
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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m server.superlink [--memory-object-store] -- <flower-superlink args>``:
    the stock SuperLink main, optionally with payloads kept in memory (launch/flwr_tuning.py)."""
    import argparse

    p = argparse.ArgumentParser(prog="server.superlink")
    p.add_argument("--memory-object-store", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    apply_flwr_env()
    from launch.flwr_tuning import configure_flwr_logging, patch_superlink_object_store

    configure_flwr_logging()
    if args.memory_object_store:
        patch_superlink_object_store()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
