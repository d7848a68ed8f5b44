"""One site's processes under ``flower-client``: the SuperNode (stock, or our launcher with one
long-lived ClientApp worker, client/supernode.py), supervised — bounded restarts, a pause while
the coordinator is gone after a run, a clean stop of both.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from client.run_status import EXIT, PAUSE, RESUME, AfterRun
from client.site_config import SiteConfig
from launch.audit import AuditLog
from launch.flwr_env import flwr_env, kv_config
from launch.process import (
    LogFollower,
    ManagedProcess,
    bin_path,
    coordinator_reachable,
    ensure_secret,
)

MAX_WORKER_RESTARTS = 5
#: A SuperNode that had joined (logged its node id) and then exited — e.g. the coordinator came
#: back with fresh state and no longer knows its node id — is restarted, at most
#: MAX_SUPERNODE_RESTARTS times; one that never joined (key not registered, coordinator
#: unreachable) is not: that needs a person (or systemd's restart policy).
MAX_SUPERNODE_RESTARTS = 5
JOINED_MARK = b"SuperNode ID:"


def supernode_args(cfg: SiteConfig) -> list[str]:
    """Arguments for flower-supernode (shared by our launcher and the stock one)."""
    args = ["--superlink", cfg.superlink, "--port", str(cfg.runtime_port),
            "--node-config", kv_config(cfg.node_config())]
    if cfg.insecure:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(cfg.ca_cert),
                 "--auth-supernode-private-key", str(cfg.private_key)]
    if cfg.tuning.reconnect_timeout_s is not None:
        args += ["--max-wait-time", str(cfg.tuning.reconnect_timeout_s)]
    return args


class Site:
    """The SuperNode (and, fast, the worker) of one site, supervised."""

    def __init__(self, cfg: SiteConfig, echo: bool = True) -> None:
        self.cfg, self.state = cfg, cfg.state_path
        self.logs = self.state / "logs"
        self.env = flwr_env(self.state / "flwr-home", {"PYTHONUNBUFFERED": "1"})
        if cfg.num_threads:
            self.env["OMP_NUM_THREADS"] = str(cfg.num_threads)
        self.audit = AuditLog(self.state / "audit.jsonl", actor=f"site:{cfg.site}")
        self.follower = LogFollower() if echo else None
        self.supernode: ManagedProcess | None = None
        self.worker: ManagedProcess | None = None
        self.secret: Path | None = None
        self.restarts = 0
        self.supernode_restarts = 0
        self.supernode_started = 0.0
        self.supernode_log_offset = 0
        self.supernode_cmd: list[str] = []
        tuning = cfg.tuning  # what to do once a run has ended (client/run_status.py)
        self.after_run = AfterRun(self.state, cfg.site, cfg.after_run,
                                  lambda: coordinator_reachable(cfg.superlink, None if cfg.insecure else cfg.ca_cert),
                                  gone_s=tuning.coordinator_gone_s, probe_s=tuning.coordinator_probe_s)

    def start(self) -> None:
        cfg, py = self.cfg, sys.executable
        args = supernode_args(cfg)
        if cfg.tuning.fast:
            self.secret = ensure_secret(self.state / "superexec.secret")
            cmd = [py, "-m", "client.supernode", "supernode", "--idle-pull-s", str(cfg.tuning.idle_pull_s)]
            if cfg.tuning.heartbeat_s:
                cmd += ["--heartbeat-s", str(cfg.tuning.heartbeat_s)]
            cmd += ["--", *args, "--isolation", "process",
                    "--superexec-auth-secret-file", str(self.secret)]
        else:
            cmd = [bin_path("flower-supernode"), *args]
        self.supernode_cmd = cmd
        self.start_supernode()
        if self.follower is not None:
            self.follower.add(self.logs / "supernode.log", cfg.site)
        if cfg.tuning.fast:
            self.start_worker()
        if self.follower is not None:
            self.follower.start()

    def start_supernode(self) -> None:
        log = self.logs / "supernode.log"
        self.supernode_log_offset = log.stat().st_size if log.exists() else 0
        self.supernode = ManagedProcess(f"supernode-{self.cfg.site}", self.supernode_cmd,
                                        self.logs / "supernode.log", env=self.env).start()
        self.supernode_started = time.monotonic()

    def start_worker(self) -> None:
        cfg = self.cfg
        cmd = [sys.executable, "-m", "client.supernode", "worker",
               "--runtime-api-address", f"127.0.0.1:{cfg.runtime_port}",
               "--secret-file", str(self.secret), "--site", cfg.site,
               "--audit-log", str(self.state / "audit.jsonl"),
               "--poll-s", str(cfg.tuning.worker_poll_s), "--parent-pid", str(os.getpid())]
        if cfg.tuning.heartbeat_s:
            cmd += ["--heartbeat-s", str(cfg.tuning.heartbeat_s)]
        for h in cfg.allowed_fab_hashes:
            cmd += ["--allow-fab-hash", h]
        self.worker = ManagedProcess(f"worker-{cfg.site}", cmd, self.logs / "worker.log",
                                     env=self.env).start()
        if self.follower is not None:
            self.follower.add(self.logs / "worker.log", f"{cfg.site}:worker")

    def supervise(self, stop: list[str]) -> int:
        """Block until a stop signal or, with ``after_run: exit``, the run's end (returns 0),
        or until the SuperNode exits (returns 1)."""
        assert self.supernode is not None
        while not stop:
            action = self.after_run.poll()
            if action == EXIT:
                return 0
            if action == PAUSE:  # the coordinator went away after the run: no retry warnings
                self._pause()
            elif action == RESUME:  # it answers again: rejoin for the next run
                self._resume()
            if self.after_run.paused:
                time.sleep(0.5)
                continue
            code = self.supernode.poll()
            if code is not None:
                uptime = time.monotonic() - self.supernode_started
                restart = self._supernode_joined() and self.supernode_restarts < MAX_SUPERNODE_RESTARTS
                print(f"site {self.cfg.site}: SuperNode exited with code {code} after "
                      f"{uptime:.0f}s{'; restarting' if restart else ''}", file=sys.stderr)
                self.audit.append("supernode_exit", site=self.cfg.site, code=code,
                                  uptime_s=round(uptime, 1), restart=restart)
                if not restart:
                    return 1
                self.supernode_restarts += 1
                self.supernode.stop(1.0)
                self.start_supernode()
            if self.worker is not None and self.worker.poll() is not None:
                self.restarts += 1
                self.audit.append("worker_exit", site=self.cfg.site, code=self.worker.poll(),
                                  restart=self.restarts)
                if self.restarts > MAX_WORKER_RESTARTS:
                    print(f"site {self.cfg.site}: worker keeps failing; stopping", file=sys.stderr)
                    return 1
                self.worker.stop(1.0)
                self.start_worker()
            time.sleep(0.5)
        return 0

    def _pause(self) -> None:
        for proc in (self.worker, self.supernode):
            if proc is not None:
                proc.stop(10.0)
        self.audit.append("site_paused", site=self.cfg.site, reason="coordinator gone after the run")

    def _resume(self) -> None:
        self.start_supernode()
        if self.cfg.tuning.fast:
            self.start_worker()
        self.audit.append("site_resumed", site=self.cfg.site)

    def _supernode_joined(self) -> bool:
        """Did the SuperNode that just exited get a node id from the SuperLink?"""
        try:
            with open(self.logs / "supernode.log", "rb") as fh:
                fh.seek(self.supernode_log_offset)
                return JOINED_MARK in fh.read()
        except OSError:
            return False

    def stop(self) -> None:
        for proc in (self.worker, self.supernode):
            if proc is not None:
                proc.stop(10.0)
        if self.follower is not None:
            self.follower.stop()
