"""``flower-server``: start the SuperLink and run one federated experiment on it.

    flower-server --config experiment.yaml --deploy coordinator.yaml [--resume]

``--config`` is the experiment (a RunSpec YAML: strategy, rounds, local epochs, quorum, round
deadline, run folder); ``--deploy`` the coordinator's deployment settings (CoordinatorConfig:
address, TLS files, state folder, sites' public keys). The SuperLink runs with TLS and node
authentication unless ``--insecure``. Sites listed in the deployment file are registered (once;
re-registering is skipped by key fingerprint). The run is submitted with ``flwr run`` and
followed until it ends; the ServerApp itself bounds every wait (quorum give-up, round timeout),
and we add an overall deadline. ``--resume`` continues from the run folder's checkpoint.

Exit status: 0 run completed, 1 failed, 2 configuration error, 3 stopped early (no quorum or
on request; the checkpoint is intact: rerun with --resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, from_dict, load_yaml
from common.federation import RunSpec, load_run_spec

REPO_ROOT = Path(__file__).resolve().parents[1]  # the Flower app (pyproject with [tool.flwr.app])


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: str | None = None
    server_cert: str | None = None
    server_key: str | None = None


@dataclass(frozen=True)
class CoordinatorConfig:
    """Deployment settings of the coordinator (not the experiment). Relative paths are resolved
    against the YAML's folder; ``database``/``audit_log`` relative to ``state_dir``."""

    host: str = "127.0.0.1"
    port: int = 9093
    state_dir: str = "coordinator-state"
    database: str = "state.db"  # ":memory:": no SuperLink state on disk (re-registers sites)
    payloads_in_memory: bool = True  # message payloads in memory even with a database file
    insecure: bool = False
    tls: TLSFiles = field(default_factory=TLSFiles)
    sites: dict[str, str] = field(default_factory=dict)  # site name -> OpenSSH public key file
    app_dir: str | None = None  # Flower app to submit (default: this source tree)
    fast: bool = True  # our ServerApp executor with a short reply poll; False: stock SuperExec
    reply_poll_s: float = 0.25
    executor_poll_s: float = 0.25
    health_timeout_s: float = 60.0
    run_timeout_s: float | None = None  # None: derived from the spec's quorum/round timeouts
    audit_log: str = "audit.jsonl"

    def __post_init__(self) -> None:
        if not self.insecure and not (self.tls.ca_cert and self.tls.server_cert and self.tls.server_key):
            raise ConfigError("coordinator: TLS needs tls.ca_cert, tls.server_cert and tls.server_key "
                              "(or insecure: true for loopback trials)")
        if not isinstance(self.sites, dict) or not all(isinstance(v, str) for v in self.sites.values()):
            raise ConfigError("coordinator: sites must map site names to public key files")

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def ca(self) -> Path | None:
        return None if self.insecure else Path(str(self.tls.ca_cert))


def load_coordinator_config(path: Path | None, overrides: dict[str, Any]) -> CoordinatorConfig:
    data = load_yaml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    where = str(path) if path is not None else "command line"
    base = (path.resolve().parent if path is not None else Path.cwd())

    def absolute(p: str | None, root: Path = base) -> str | None:
        return None if p is None else str(p if Path(p).is_absolute() else (root / Path(p).expanduser()).resolve())

    try:
        cfg = from_dict(CoordinatorConfig, data, where)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    state = Path(str(absolute(cfg.state_dir)))
    return dataclasses.replace(
        cfg, state_dir=str(state), app_dir=absolute(cfg.app_dir),
        database=cfg.database if cfg.database == ":memory:" else str(absolute(cfg.database, state)),
        audit_log=str(absolute(cfg.audit_log, state)),
        tls=TLSFiles(*(absolute(getattr(cfg.tls, f.name)) for f in dataclasses.fields(TLSFiles))),
        sites={k: str(absolute(v)) for k, v in cfg.sites.items()},
    )


def default_run_timeout(spec: RunSpec) -> float:
    """Upper bound on a run: quorum waits plus two message rounds per round, with slack."""
    fed = spec.federation
    return fed.rounds * (fed.quorum_timeout_s + 3 * fed.round_timeout_s + 120.0) + 600.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-server", description="Run a federated experiment.")
    p.add_argument("--config", type=Path, required=True, help="experiment (RunSpec) YAML")
    p.add_argument("--deploy", type=Path, help="coordinator deployment YAML (CoordinatorConfig)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--state-dir", help="coordinator state folder (overrides state_dir)")
    p.add_argument("--host", help="bind address of the SuperLink (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="SuperLink port (Fleet, Control and Runtime APIs)")
    p.add_argument("--app-dir", help="Flower app directory to submit")
    p.add_argument("--insecure", action="store_true", help="plaintext, no node authentication")
    p.add_argument("--stock", action="store_true", help="stock ServerApp timing (SuperExec)")
    p.add_argument("--register-only", action="store_true",
                   help="start the SuperLink, register the configured sites, stop")
    p.add_argument("--quiet", action="store_true", help="do not echo the ServerApp log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_run_spec(args.config)
        cfg = load_coordinator_config(args.deploy, {
            "state_dir": args.state_dir, "host": args.host, "port": args.port,
            "app_dir": args.app_dir, "insecure": True if args.insecure else None,
            "fast": False if args.stock else None})
    except ConfigError as exc:
        print(f"flower-server: {exc}", file=sys.stderr)
        return 2
    from server.coordinator import Coordinator  # flwr imports only after the config is valid

    coordinator = Coordinator(cfg, spec, Path(args.config).resolve(), echo=not args.quiet)
    stop: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return coordinator.main(resume=args.resume, register_only=args.register_only, stop=stop)


if __name__ == "__main__":
    sys.exit(main())
