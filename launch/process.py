"""Process supervision for both launchers (flower-server and flower-client): children in their
own process groups (stop() reaches the whole tree), logs appended to files and echoed with a
prefix, bounded health waits, console scripts of this interpreter, 0600 shared secrets."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

logger = logging.getLogger(__name__)


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


def coordinator_reachable(address: str, ca_cert: str | Path | None, timeout: float = 5.0) -> bool:
    """Does the SuperLink at ``address`` (host:port; https unless ``ca_cert`` is None) answer?
    Any HTTP answer below 500 counts: the SuperLink says 200 to ``/health``, a proxy in front of
    it 404, and a proxy whose SuperLink is down 502/503/504. Refused, timed out or a TLS
    failure (not our federation's server) count as unreachable."""
    import httpx  # flwr dependency

    url = f"{'http' if ca_cert is None else 'https'}://{address}/health"
    verify: str | bool = str(ca_cert) if ca_cert is not None else False
    try:
        return httpx.get(url, verify=verify, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def ensure_secret(path: str | Path, nbytes: int = 32) -> Path:
    """A random shared secret file (mode 0600) for SuperExec-to-Runtime-API authentication."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(nbytes).hex().encode())
    return path
