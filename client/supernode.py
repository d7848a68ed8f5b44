"""Our own entry points for a site's SuperNode and a long-lived ("warm") ClientApp worker.

Stock Flower 1.41 spends most of a small round waiting, not computing (source: flwr 1.41.0):
an idle SuperNode sleeps 3 s between pulls and polls its finished reply every 0.5 s
(``supernode/start_client_internal.py``), and with ``--isolation subprocess`` every message
starts a fresh ``flwr-clientapp`` process that imports torch again. From our own launcher we
(1) run the stock ``flower-supernode`` main with those sleeps shortened, and (2) start it with
``--isolation process`` next to one worker process that imports the ClientApp once and then
serves every task the SuperNode hands out over its local Runtime API (AcquireTask, signed with
a shared secret, exactly as the stock SuperExec does).

The worker runs the ClientApp *installed at the site* (``client.app:app``) rather than code
shipped in the coordinator's FAB, and refuses FABs whose app name/version differ from the
installed package, or whose sha256 is not in the site's allow-list when one is configured.
Every task is written to the site's own audit log with the FAB hash.

  python -m client.supernode supernode [--idle-pull-s S] [--heartbeat-s S] -- <flower-supernode args>
  python -m client.supernode worker --runtime-api-address 127.0.0.1:9094 --secret-file F ...
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from launch.audit import AuditLog
from launch.flwr_env import apply_flwr_env
from launch.flwr_tuning import (
    ShortSleeps,
    check_flwr_version,
    configure_flwr_logging,
    patch_heartbeat,
    patch_object_pulls,
)

logger = logging.getLogger(__name__)
EXIT_GAVE_UP = 1  # the SuperNode lost the coordinator for longer than --max-wait-time

def patch_supernode(idle_pull_s: float, reply_poll_s: float = 0.05) -> None:
    """Shorten the SuperNode loop's idle pull sleep (3 s), reply poll (0.5 s) and first
    object-pull retry (1 s)."""
    check_flwr_version()
    import flwr.supernode.start_client_internal as sci

    sci.time = ShortSleeps(idle_pull_s, reply_poll_s)  # type: ignore[attr-defined]
    patch_object_pulls(sci, "pull_objects")


def patch_worker() -> None:
    """The worker pulls each message from the SuperNode with the same 1 s first retry."""
    import flwr.supernode.runtime.run_clientapp as rc

    patch_object_pulls(rc, "pull_and_inflate_object_from_tree")


def run_supernode(argv: Sequence[str]) -> None:
    """``flower-supernode`` with our timing patches; argv: [patch options] -- [supernode args]."""
    p = argparse.ArgumentParser(prog="client.supernode supernode")
    p.add_argument("--idle-pull-s", type=float, default=0.5)
    p.add_argument("--heartbeat-s", type=float, default=None)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    apply_flwr_env()
    configure_flwr_logging()
    patch_supernode(args.idle_pull_s)
    patch_heartbeat(args.heartbeat_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    # It returns only after giving up reconnecting (``--max-wait-time``), and its Runtime API
    # thread would then keep this process alive for ever: exit, so the launcher sees it.
    logger.error("SuperNode gave up reconnecting to the coordinator; exiting")
    logging.shutdown()
    os._exit(EXIT_GAVE_UP)


class FabRejected(RuntimeError):
    """The coordinator's app is not the one installed/allowed at this site."""


class Worker:
    """Serves ClientApp tasks from the local SuperNode's Runtime API in one process."""

    def __init__(self, runtime_api_address: str, secret: bytes | None, site: str,
                 app_ref: str = "client.app:app", allowed_fab_hashes: Sequence[str] = (),
                 audit: AuditLog | None = None, poll_s: float = 0.05,
                 dist: str = "fedbus") -> None:
        self.address, self.secret, self.site = runtime_api_address, secret, site
        self.app_ref, self.allowed = app_ref, {h.lower() for h in allowed_fab_hashes}
        self.audit, self.poll_s = audit, poll_s
        self.app: Callable[..., Any] | None = None
        self.dist = dist  # installed distribution the coordinator's FAB must match
        self.stop_event = threading.Event()

    def load_app(self) -> None:
        """Import the site-installed ClientApp once (this is where torch gets imported)."""
        from flwr.clientapp import ClientApp
        from flwr.supercore.object_ref import load_app

        t0 = time.perf_counter()
        app = load_app(self.app_ref, RuntimeError, project_dir=None)
        if not isinstance(app, ClientApp):
            raise TypeError(f"{self.app_ref} is not a flwr ClientApp")
        self.app = app
        logger.info("worker for site %s loaded %s in %.1fs", self.site, self.app_ref,
                    time.perf_counter() - t0)

    def _installed(self) -> tuple[str, str]:
        try:
            return self.dist, metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            return self.dist, "unknown"

    def check_fab(self, fab_id: str, fab_version: str, fab_hash: str) -> None:
        name, version = self._installed()
        if fab_id.rsplit("/", 1)[-1] != name or fab_version != version:
            raise FabRejected(f"coordinator app {fab_id}=={fab_version} but site runs "
                              f"{name}=={version}")
        if self.allowed and fab_hash.lower() not in self.allowed:
            raise FabRejected(f"FAB {fab_hash[:12]} is not in this site's allow-list")

    def _client(self, interceptors: list[Any]) -> Any:
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          *interceptors],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until stopped (or ``max_tasks`` done); returns tasks run."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor

        if self.app is None:
            self.load_app()
        auth = ([SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                              protected_methods={"/flwr.proto.Runtime/AcquireTask"})]
                if self.secret else [])
        acquirer = self._client(auth)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        done = 0
        try:
            while not self.stop_event.is_set() and (max_tasks is None or done < max_tasks):
                res = acquirer.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    done += 1
                else:
                    self.stop_event.wait(self.poll_s)
        finally:
            acquirer.close()
        return done

    def run_task(self, token: str) -> None:
        """One ClientApp execution: the body of flwr's ``run_clientapp`` without the exit."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = self._client([RuntimeTokenHttpInterceptor(token)])
        lost = threading.Event()

        def beat() -> bool:  # stock version raises SIGINT on refusal, which would kill us
            try:
                ok = bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
            except Exception:  # noqa: BLE001 - transient; HeartbeatSender retries
                return False
            if not ok:
                lost.set()
            return True

        heartbeat = HeartbeatSender(beat)
        message = context = reply = None
        sub_status, details, info = SubStatus.FAILED, "task failed", {}
        t0 = t_pulled = t_app = time.perf_counter()
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            t_pulled = time.perf_counter()
            info = {"run_id": run.run_id, "message_type": message.metadata.message_type,
                    "fab_id": run.fab_id, "fab_version": run.fab_version, "fab_sha256": fab.hash_str}
            self.check_fab(run.fab_id, run.fab_version, fab.hash_str)
            assert self.app is not None
            reply = self.app(message=message, context=context)
            t_app = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - becomes an error reply, like stock Flower
            logger.error("site %s: task failed", self.site, exc_info=True)
            safe = type(exc).__name__ in ("SiteError", "FabRejected")
            reason = f"{type(exc).__name__}: {exc}" if safe else \
                f"{type(exc).__name__} at site {self.site} (details in the site's log)"
            details = reason
            code = ErrorCode.INVALID_FAB if isinstance(exc, FabRejected) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None and not lost.is_set():
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                logger.error("site %s: could not push the reply", self.site, exc_info=True)
                sub_status = SubStatus.FAILED
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        t_end = time.perf_counter()
        seconds = round(t_end - t0, 3)
        logger.info("site %s: %s task %s in %.2fs (pull %.2fs, app %.2fs, reply %.2fs)",
                    self.site, info.get("message_type", "?"), sub_status, seconds,
                    t_pulled - t0, max(t_app - t_pulled, 0.0), t_end - max(t_app, t_pulled))
        if self.audit is not None:
            self.audit.append("task", site=self.site, outcome=sub_status, seconds=seconds,
                              **info, **({"reason": details} if details else {}))


def run_worker(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="client.supernode worker")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--secret-file", type=Path, default=None)
    p.add_argument("--site", required=True)
    p.add_argument("--app", default="client.app:app")
    p.add_argument("--dist", default="fedbus", help="installed package the FAB must match")
    p.add_argument("--allow-fab-hash", action="append", default=[])
    p.add_argument("--audit-log", type=Path, default=None)
    p.add_argument("--poll-s", type=float, default=0.1)
    p.add_argument("--heartbeat-s", type=float, default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    apply_flwr_env()
    configure_flwr_logging()
    check_flwr_version()
    patch_heartbeat(args.heartbeat_s)
    patch_worker()
    if args.parent_pid:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    secret = args.secret_file.read_bytes() if args.secret_file else None
    audit = AuditLog(args.audit_log, actor=f"site:{args.site}") if args.audit_log else None
    worker = Worker(args.runtime_api_address, secret, args.site, args.app, args.allow_fab_hash,
                    audit, args.poll_s, args.dist)
    worker.load_app()
    if audit is not None:
        name, version = worker._installed()
        audit.append("worker_start", site=args.site, app=args.app, package=name, version=version)
    try:
        worker.serve()
    except KeyboardInterrupt:
        logger.info("worker for site %s stopped", args.site)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("supernode", "worker"):
        sys.exit("usage: python -m client.supernode {supernode|worker} ...")
    (run_supernode if argv[0] == "supernode" else run_worker)(argv[1:])


if __name__ == "__main__":
    main()
