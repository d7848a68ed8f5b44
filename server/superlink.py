"""Process management for the coordinator and the sites: children in their own process groups,
bounded health waits, the Flower environment we launch everything with, and the Flower
configuration (FLWR_HOME/config.toml) that ``flwr run``/``flwr supernode`` need.

Every child gets telemetry, the update check and runtime dependency installation switched off
(``FLWR_ENV``). FLWR_HOME always lives in a state folder outside the app directory: ``flwr run``
bundles the app directory into the FAB, and a Flower home inside it breaks the FAB depth check.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

logger = logging.getLogger(__name__)

#: Set in every process we start (and in our own): no phone-home, no `uv sync` at run time.
FLWR_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
CONNECTION = "fedbus"  # connection name in our FLWR_HOME/config.toml


def flwr_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus FLWR_ENV (and FLWR_HOME when given), with this interpreter's bin folder
    first on PATH: the SuperLink/SuperNode start ``flower-superexec`` and ``flwr-*app`` by name."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]).rstrip(os.pathsep)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def apply_flwr_env(flwr_home: str | Path | None = None) -> None:
    """Put FLWR_ENV into this process's environment (before flwr is imported)."""
    os.environ.update(FLWR_ENV)
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home)


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment (falls back to PATH lookup)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_host(host: str) -> str:
    """Address a local client uses to reach a server bound to ``host`` (bind-all → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class ProcessError(RuntimeError):
    """A managed process failed to start or died; the message carries its log tail."""


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the launching thread's process dies,
    so a SIGKILLed launcher leaves no orphaned SuperLink/SuperNode behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ManagedProcess:
    """One child process in its own session (so stop() reaches its whole tree: SuperExec,
    ServerApp, ClientApp children), stdout+stderr appended to ``log_path``. On Linux the child
    is also sent SIGTERM if the launcher dies (start it from a thread that outlives it)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: str | Path,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 stdin_data: bytes | None = None) -> None:
        self.name, self.cmd, self.log_path = name, list(cmd), Path(log_path)
        self.env, self.cwd, self.stdin_data = dict(env) if env else None, cwd, stdin_data
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start {self.name}: "
                        f"{' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            stdin=subprocess.PIPE if self.stdin_data is not None else subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        if self.stdin_data is not None and self.proc.stdin is not None:
            self.proc.stdin.write(self.stdin_data)
            self.proc.stdin.close()
        logger.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after ``timeout`` seconds."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            if self.wait(timeout) is None:
                logger.warning("%s did not stop within %.0fs: killing", self.name, timeout)
        self.signal_group(signal.SIGKILL)  # stragglers in the group (grandchildren)
        code = self.wait(5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LogFollower:
    """Echo new lines of some log files to a stream, each prefixed with its name (the operator's
    console, or journald under systemd). A daemon thread; polls every ``interval`` seconds."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.5) -> None:
        self.stream, self.interval = stream or sys.stdout, interval
        self._files: dict[Path, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)

    def add(self, path: str | Path, prefix: str, from_end: bool = True) -> None:
        path = Path(path)
        start = path.stat().st_size if from_end and path.exists() else 0
        with self._lock:
            self._files[path] = (prefix, start)

    def start(self) -> "LogFollower":
        self._thread.start()
        return self

    def poll(self) -> None:
        with self._lock:
            items = list(self._files.items())
        for path, (prefix, pos) in items:
            try:
                with open(path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            for line in complete.decode("utf-8", "replace").splitlines():
                self.stream.write(f"[{prefix}] {line}\n")
            if complete:
                self.stream.flush()
            with self._lock:
                self._files[path] = (prefix, pos + len(complete))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.poll()


def wait_for_health(address: str, ca_cert: str | Path | None, timeout: float,
                    proc: ManagedProcess | None = None) -> float:
    """Poll ``GET /health`` on ``address`` (host:port; https unless ``ca_cert`` is None) until it
    answers 200; returns the seconds waited. Raises ProcessError on timeout or if ``proc`` dies."""
    import httpx  # flwr dependency

    url = f"{'http' if ca_cert is None else 'https'}://{address}/health"
    verify: str | bool = str(ca_cert) if ca_cert is not None else False
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"{proc.name} exited with code {proc.poll()} before it was "
                               f"healthy; log tail:\n{proc.tail()}")
        try:
            if httpx.get(url, verify=verify, timeout=2.0).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            tail = f"; log tail:\n{proc.tail()}" if proc is not None else ""
            raise ProcessError(f"{url} not healthy after {timeout:.0f}s{tail}")
        time.sleep(0.25)


def toml_value(value: object) -> str:
    """A Python scalar as a TOML literal (for --run-config / --node-config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def kv_config(values: Mapping[str, object]) -> str:
    """``{"site": "udiat", "synthetic-n": 16}`` → ``site="udiat" synthetic-n=16`` (None skipped)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items() if v is not None)


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
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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


def ensure_secret(path: str | Path, nbytes: int = 32) -> Path:
    """A random shared secret file (mode 0600) for SuperExec-to-Runtime-API authentication."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(nbytes).hex().encode())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m server.superlink [--memory-object-store] -- <flower-superlink args>``:
    the stock SuperLink main, optionally with payloads kept in memory (server/flwr_tuning.py)."""
    import argparse

    p = argparse.ArgumentParser(prog="server.superlink")
    p.add_argument("--memory-object-store", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    apply_flwr_env()
    from server.flwr_tuning import configure_flwr_logging, patch_superlink_object_store

    configure_flwr_logging()
    if args.memory_object_store:
        patch_superlink_object_store()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
