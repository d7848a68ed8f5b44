"""What ``flower-server`` does, step by step: SuperLink up, sites registered, run submitted and
followed to its end, everything audited, everything stopped.

State folder (``CoordinatorConfig.state_dir``), kept outside the app directory::

    flwr-home/config.toml   Flower configuration with our one connection ("fedbus")
    state.db                SuperLink state (runs, registered nodes)
    superexec.secret        shared secret of our ServerApp executor (0600)
    audit.jsonl             append-only, hash-chained audit log
    logs/                   superlink.log, serverapp-<run>.log
"""
from __future__ import annotations

import logging
import sys
import time
from importlib import metadata
from pathlib import Path

from common.federation import RunSpec
from launch.audit import AuditLog, file_sha256, process_identity
from launch.flwr_env import apply_flwr_env, flwr_env
from launch.process import (
    LogFollower, ManagedProcess, ProcessError, bin_path, ensure_secret, wait_for_health,
)
from server.control import (
    Control, ControlError, NodeRow, fab_preflight, key_fingerprint, submit_run,
)
from server.coordinator_config import REPO_ROOT, CoordinatorConfig, default_run_timeout
from server.identity import remove_site_registry, write_site_registry
from server.run_watcher import RunFolderWatcher
from server.superlink import CONNECTION, SuperLinkLaunch, write_flwr_config

logger = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3
MONITOR_S, STOP_GRACE_S = 2.0, 10.0  # run/site polling period; wait for a requested stop
RUN_CONFIG_KEYS = ("run-spec", "resume")  # what we pass to the ServerApp (server/app.py)


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, spec: RunSpec, spec_path: Path, echo: bool = True) -> None:
        self.cfg, self.spec, self.spec_path = cfg, spec, spec_path
        self.state = cfg.state
        self.home = self.state / "flwr-home"
        self.logs = self.state / "logs"
        self.app_dir = Path(cfg.app_dir) if cfg.app_dir else REPO_ROOT
        self.follower = LogFollower() if echo else None
        self.superlink: ManagedProcess | None = None
        self.executor = None
        self.log_proc: ManagedProcess | None = None
        self.control: Control | None = None
        self.audit: AuditLog | None = None
        self.launch: SuperLinkLaunch | None = None
        self.registry: dict[int, str] | None = None  # node id → registered name, as last written

    # ------------------------------------------------------------------ steps
    def preflight(self, resume: bool) -> None:
        """Fail before starting anything: TLS files, site keys, app bundle, run folder."""
        cfg = self.cfg
        for label, path in (("CA certificate", cfg.tls.ca_cert), ("server certificate", cfg.tls.server_cert),
                            ("server key", cfg.tls.server_key)):
            if not cfg.insecure and not Path(str(path)).is_file():
                raise ControlError(f"{label} {path} not found")
        for site, pub in cfg.sites.items():
            if not Path(pub).is_file():
                raise ControlError(f"public key of site {site}: {pub} not found")
        self.fab_size, self.fab_sha256 = fab_preflight(self.app_dir)
        _check_run_config_keys(self.app_dir, RUN_CONFIG_KEYS)
        if resume and self.spec.federation.secagg.enabled:
            raise ControlError("federation.secagg: SecAgg+ runs do not resume; start a new run (new run_dir)")
        checkpoint = Path(self.spec.run_dir) / "checkpoint.pt"
        if checkpoint.exists() and not resume:
            raise ControlError(f"{checkpoint} exists: pass --resume to continue that run, or "
                               "choose another run_dir")
        if self.state.resolve().is_relative_to(self.app_dir.resolve()):
            logger.warning("state folder %s is inside the app folder %s: keep it git-ignored "
                           "(the FAB bundles the app folder)", self.state, self.app_dir)

    def start_superlink(self) -> None:
        cfg = self.cfg
        self.state.mkdir(parents=True, exist_ok=True)
        apply_flwr_env(self.home)
        secret = ensure_secret(self.state / "superexec.secret") if cfg.fast else None
        self.launch = SuperLinkLaunch(
            host=cfg.host, port=cfg.port,
            database=None if cfg.database == ":memory:" else Path(cfg.database),
            ca_cert=cfg.ca, server_cert=None if cfg.insecure else Path(str(cfg.tls.server_cert)),
            server_key=None if cfg.insecure else Path(str(cfg.tls.server_key)),
            node_auth=not cfg.insecure, isolation="process" if cfg.fast else "subprocess",
            exec_secret_file=secret,
            memory_objects=cfg.payloads_in_memory and cfg.database != ":memory:")
        self.superlink = ManagedProcess("superlink", self.launch.command(), self.logs / "superlink.log",
                                        env=flwr_env(self.home)).start()
        waited = wait_for_health(self.launch.local_address, cfg.ca, cfg.health_timeout_s, self.superlink)
        print(f"SuperLink healthy on {cfg.host}:{cfg.port} after {waited:.1f}s "
              f"({'TLS + node authentication' if not cfg.insecure else 'INSECURE'})")
        write_flwr_config(self.home, self.launch.local_address, cfg.ca)
        self.control = Control(self.launch.local_address, cfg.ca)

    def register_sites(self) -> None:
        assert self.control is not None and self.audit is not None
        known = {n.key_sha256: n for n in self.control.nodes() if n.status != "unregistered"}
        for site, pub in sorted(self.cfg.sites.items()):
            fingerprint = key_fingerprint(Path(pub).read_bytes())
            if fingerprint in known:
                if known[fingerprint].name != site:
                    raise ControlError(f"key {pub} is registered as {known[fingerprint].name!r}, not {site!r}")
                continue
            node_id = self.control.register(site, pub)
            self.audit.append("site_registered", site=site, node_id=node_id, key_sha256=fingerprint)
            print(f"registered site {site} (node {node_id})")

    def publish_registry(self, nodes: list[NodeRow] | None = None) -> None:
        """Write the SuperLink's registry (node id → name its key was registered under) into
        the run folder for the ServerApp (server/identity.py), again whenever it changes.
        Without node authentication nodes have no keys: any earlier registry is removed."""
        assert self.control is not None
        if self.cfg.insecure:
            remove_site_registry(self.spec.run_dir)
            return
        rows = self.control.nodes() if nodes is None else nodes
        names = {n.node_id: n.name for n in rows if n.status != "unregistered"}
        if names != self.registry:
            write_site_registry(self.spec.run_dir, names, self.cfg.audit_log)
            self.registry = names

    def start_executor(self) -> None:
        """Fast mode: our ServerApp executor (server/serverapp_exec.py)."""
        from server.serverapp_exec import ServerAppExecutor

        assert self.launch is not None
        secret = (self.state / "superexec.secret").read_bytes()

        def on_start(run_id: int, proc: ManagedProcess) -> None:
            if self.follower is not None:
                self.follower.add(proc.log_path, "serverapp", from_end=False)

        self.executor = ServerAppExecutor(
            self.launch.local_address, self.cfg.ca, secret, self.state, self.home,
            reply_poll_s=self.cfg.reply_poll_s, poll_s=self.cfg.executor_poll_s, on_start=on_start,
            max_tasks=1).start()  # flower-server runs one run

    def follow_stock_logs(self, run_id: int) -> None:
        """Stock mode: the SuperExec swallows ServerApp output; stream it with `flwr log`."""
        self.log_proc = ManagedProcess("flwr-log", [bin_path("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                       self.logs / f"serverapp-{run_id}.log", env=flwr_env(self.home)).start()
        if self.follower is not None:
            self.follower.add(self.log_proc.log_path, "serverapp", from_end=False)

    def follow_run(self, run_id: int, stop: list[str], after_round: int = 0) -> tuple[str, str]:
        """Poll until the run finishes, a stop signal, or the deadline; returns (sub_status, details)."""
        assert self.control is not None and self.audit is not None
        watcher = RunFolderWatcher(self.spec.run_dir, self.audit, run_id, after_round=after_round)
        deadline = time.monotonic() + (self.cfg.run_timeout_s or default_run_timeout(self.spec))
        online: dict[int, str] = {}
        stop_sent = None
        while True:
            self._audit_nodes(online)
            watcher.poll()
            row = self.control.run(run_id)
            if row is not None and row.finished:
                watcher.poll()
                return row.sub_status, row.details
            if self.executor is not None and self.executor.error is not None:
                raise ProcessError(f"ServerApp executor failed: {self.executor.error}")
            if self.superlink is not None and self.superlink.poll() is not None:
                raise ProcessError(f"SuperLink exited ({self.superlink.poll()}):\n{self.superlink.tail()}")
            now = time.monotonic()
            if (stop or now > deadline) and stop_sent is None:
                reason = f"signal {stop[0]}" if stop else "run deadline reached"
                print(f"stopping run {run_id}: {reason}", file=sys.stderr)
                self.audit.append("run_stop_requested", run_id=run_id, reason=reason)
                self.control.stop_run(run_id)
                stop_sent = now
            if stop_sent is not None and now - stop_sent > STOP_GRACE_S:
                return "stopped", f"did not confirm the stop within {STOP_GRACE_S:.0f}s"
            time.sleep(MONITOR_S)

    def _audit_nodes(self, online: dict[int, str]) -> None:
        assert self.control is not None and self.audit is not None
        nodes = self.control.nodes()
        self.publish_registry(nodes)
        for node in nodes:
            was = online.get(node.node_id)
            if node.status == "online" and was != "online":
                self.audit.append("site_online", site=node.name, node_id=node.node_id,
                                  key_sha256=node.key_sha256)
            elif node.status != "online" and was == "online":
                self.audit.append("site_offline", site=node.name, node_id=node.node_id, status=node.status)
            online[node.node_id] = node.status

    # ------------------------------------------------------------------ whole run
    def main(self, resume: bool, register_only: bool, stop: list[str]) -> int:
        try:
            self.preflight(resume)
        except ControlError as exc:
            print(f"flower-server: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        self.state.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.cfg.audit_log, actor="coordinator")
        self.audit.append("coordinator_start", version=_version(), host=self.cfg.host, port=self.cfg.port,
                          tls=not self.cfg.insecure, node_auth=not self.cfg.insecure, fast=self.cfg.fast,
                          spec=str(self.spec_path), spec_sha256=file_sha256(self.spec_path),
                          resume=resume, **process_identity())
        code, reason = EXIT_FAILED, "error"
        try:
            self.start_superlink()
            self.register_sites()
            if register_only:
                code, reason = EXIT_OK, "registered"
                return code
            if self.follower is not None:
                self.follower.start()
            if self.cfg.fast:
                self.start_executor()
            start_status = _run_folder_status(self.spec.run_dir) if resume else {}
            self.publish_registry()
            run_config = dict(zip(RUN_CONFIG_KEYS, (str(self.spec_path), resume)))
            run_id = submit_run(self.app_dir, run_config, self.home)
            row = self.control.run(run_id) if self.control else None
            self.audit.append("run_submitted", run_id=run_id, resume=resume,
                              resume_after_round=int(start_status.get("round", 0)) if resume else None,
                              fab_sha256=row.fab_hash if row else self.fab_sha256,
                              fab_id=row.fab_id if row else "", fab_version=row.fab_version if row else "",
                              fab_bytes=self.fab_size, run_dir=self.spec.run_dir,
                              rounds=self.spec.federation.rounds, strategy=self.spec.federation.strategy,
                              client_dp=self.spec.federation.client_dp.mode,
                              secagg=self.spec.federation.secagg.enabled)
            print(f"run {run_id} submitted (FAB sha256 {row.fab_hash if row else self.fab_sha256})")
            if not self.cfg.fast:
                self.follow_stock_logs(run_id)
            sub_status, details = self.follow_run(run_id, stop, after_round=int(start_status.get("round", 0)))
            status = _run_folder_status(self.spec.run_dir)
            self.audit.append("run_finished", run_id=run_id, sub_status=sub_status, details=details,
                              folder_state=status.get("state"), last_round=status.get("round"))
            if sub_status == "completed" and status.get("state") == "finished":
                code, reason = EXIT_OK, "completed"
            elif status.get("state") == "stopped" or stop or sub_status == "stopped":
                code, reason = EXIT_STOPPED, status.get("message") or sub_status
            else:
                code, reason = EXIT_FAILED, details or sub_status
            print(f"run {run_id} {sub_status}; run folder {self.spec.run_dir}: "
                  f"{status.get('state', '?')} after round {status.get('round', '?')}")
            if status.get("message"):
                print(status["message"])
            return code
        except (ControlError, ProcessError) as exc:
            print(f"flower-server: {exc}", file=sys.stderr)
            reason = str(exc).splitlines()[0]
            return EXIT_FAILED
        finally:
            self.shutdown()
            self.audit.append("coordinator_stop", reason=reason, exit_code=code)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.stop(10.0)
        if self.log_proc is not None:
            self.log_proc.stop(5.0)
        if self.control is not None:
            self.control.close()
        if self.superlink is not None:
            self.superlink.stop(10.0)
        if self.follower is not None:
            self.follower.stop()


def _check_run_config_keys(app_dir: Path, keys: tuple[str, ...]) -> None:
    """`flwr run --run-config` only overrides keys the app declares in pyproject.toml
    [tool.flwr.app.config]; fail here rather than in the ServerApp."""
    import tomllib

    try:
        config = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ControlError(f"{app_dir}/pyproject.toml: no [tool.flwr.app.config] ({exc})") from exc
    missing = [k for k in keys if k not in config]
    if missing:
        raise ControlError(f"{app_dir}/pyproject.toml: [tool.flwr.app.config] must declare {missing} "
                           '(e.g. run-spec = "" and resume = false) for flower-server to pass them')


def _run_folder_status(run_dir: str) -> dict:
    import json

    try:
        return dict(json.loads((Path(run_dir) / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def _version() -> str:
    try:
        return metadata.version("fedbus")
    except metadata.PackageNotFoundError:
        return "unknown"
