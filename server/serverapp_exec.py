"""The coordinator's ServerApp executor (SuperLink started with ``--isolation process``).

Stock Flower's SuperExec launches the stock ``flwr-serverapp``, whose Grid polls for replies
every 3 s (``superlink/grid/http_grid.py``, flwr 1.41.0) — on average 1.5 s lost per message
round trip, twice per round. Here flower-server acquires the ServerApp task itself (AcquireTask
on the SuperLink's Runtime API, signed with the SuperExec shared secret) and starts the stock
``flwr-serverapp`` main in a child process with that poll interval shortened. The task token is
handed over in a 0600 file that the child reads at start-up and we delete afterwards.

  python -m server.serverapp_exec --reply-poll-s 0.2 -- <flwr-serverapp args>
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from launch.flwr_env import apply_flwr_env, flwr_env
from launch.flwr_tuning import (
    ShortSleeps,
    check_flwr_version,
    configure_flwr_logging,
    patch_heartbeat,
    patch_object_pulls,
)
from launch.process import ManagedProcess

logger = logging.getLogger(__name__)
_APP_PACKAGES = ("server", "client", "common", "sim", "launch")


def patch_grid(reply_poll_s: float) -> None:
    """Shorten ``HttpGrid.send_and_receive``'s 3 s reply poll (that module's only sleep)."""
    import flwr.superlink.grid.http_grid as http_grid

    check_flwr_version()
    http_grid.time = ShortSleeps(reply_poll_s, reply_poll_s)  # type: ignore[attr-defined]
    patch_object_pulls(http_grid, "pull_objects")


class ServerAppExecutor:
    """Polls the SuperLink for ServerApp tasks and runs each in a patched child process."""

    def __init__(self, runtime_address: str, ca_cert: Path | None, secret: bytes | None,
                 work_dir: Path, flwr_home: Path, reply_poll_s: float = 0.2,
                 poll_s: float = 0.2, on_start: Callable[[int, ManagedProcess], None] | None = None,
                 heartbeat_s: float | None = None, max_tasks: int | None = None) -> None:
        self.address, self.ca_cert, self.secret = runtime_address, ca_cert, secret
        self.work_dir, self.flwr_home = work_dir, flwr_home
        self.reply_poll_s, self.poll_s, self.on_start = reply_poll_s, poll_s, on_start
        self.heartbeat_s, self.max_tasks = heartbeat_s, max_tasks
        self.procs: list[ManagedProcess] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _client(self):  # type: ignore[no-untyped-def]
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=self.secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.ca_cert is None,
            root_certificates=None if self.ca_cert is None else self.ca_cert.read_bytes(),
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def start(self) -> "ServerAppExecutor":
        self._thread = threading.Thread(target=self._loop, name="serverapp-executor", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
        try:
            while not self._stop.is_set():
                if self.max_tasks is not None and len(self.procs) >= self.max_tasks:
                    # Done polling, but this thread must live on: its children die with it
                    # (ManagedProcess sets PR_SET_PDEATHSIG, which follows the launching thread).
                    self._stop.wait(1.0)
                    continue
                res = client.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self._launch(int(res.task.run_id), res.token)
                self._stop.wait(self.poll_s)
        except BaseException as exc:  # noqa: BLE001 - surfaced to flower-server's monitor
            if not self._stop.is_set():
                logger.error("ServerApp executor failed: %s", exc)
                self.error = exc
        finally:
            client.close()

    def _launch(self, run_id: int, token: str) -> None:
        tokens = self.work_dir / "tokens"
        tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
        token_file = tokens / f"run-{run_id}-{time.time_ns()}"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        cmd = [sys.executable, "-m", "server.serverapp_exec",
               "--reply-poll-s", str(self.reply_poll_s), "--token-file-cleanup",
               *(["--heartbeat-s", str(self.heartbeat_s)] if self.heartbeat_s else []), "--",
               "--runtime-api-address", self.address, "--token-file", str(token_file),
               "--parent-pid", str(os.getpid())]
        cmd += ["--insecure"] if self.ca_cert is None else ["--root-certificates", str(self.ca_cert)]
        proc = ManagedProcess(f"serverapp-run-{run_id}", cmd,
                              self.work_dir / "logs" / f"serverapp-{run_id}.log",
                              env=flwr_env(self.flwr_home, {"PYTHONUNBUFFERED": "1"})).start()
        self.procs.append(proc)
        if self.on_start is not None:
            self.on_start(run_id, proc)

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for proc in self.procs:
            proc.stop(timeout)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="server.serverapp_exec")
    p.add_argument("--reply-poll-s", type=float, default=0.2)
    p.add_argument("--heartbeat-s", type=float, default=None)
    p.add_argument("--token-file-cleanup", action="store_true",
                   help="delete --token-file once it has been read")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    apply_flwr_env()
    configure_flwr_logging()
    patch_grid(args.reply_poll_s)
    if args.heartbeat_s:
        patch_heartbeat(args.heartbeat_s)
    if args.token_file_cleanup and "--token-file" in rest:
        token_file = Path(rest[rest.index("--token-file") + 1])
        token = token_file.read_text().strip()
        token_file.unlink(missing_ok=True)
        i = rest.index("--token-file")
        rest = [*rest[:i], "--token", token, *rest[i + 2:]]
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    # Forget our own packages: the ServerApp must be imported from the installed FAB (Flower
    # puts its folder first on sys.path), not from the copy this launcher was started from.
    for name in [m for m in sys.modules if m.split(".")[0] in _APP_PACKAGES]:
        del sys.modules[name]
    sys.argv = ["flwr-serverapp", *rest]
    flwr_serverapp()


if __name__ == "__main__":
    main()
