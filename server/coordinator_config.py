"""The coordinator's deployment settings (``--deploy coordinator.yaml``): address, TLS files,
state folder, the sites' public keys, timing. Read by flower-server before anything starts;
imports no flwr (the launcher stays light, tests/test_light_imports.py)."""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, from_dict, load_yaml
from common.federation import RunSpec, check_site_name

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
    #: insecure on a non-loopback host serves plaintext without node authentication to the
    #: network: refused unless this second, explicit switch says so
    allow_insecure_network: bool = False
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
        if self.insecure and not is_loopback(self.host) and not self.allow_insecure_network:
            raise ConfigError(f"coordinator: insecure (plaintext, no node authentication) on host "
                              f"{self.host!r} would expose the SuperLink to the network; use a "
                              "loopback host (127.0.0.1), TLS, or add --allow-insecure-network "
                              "(allow_insecure_network: true) to accept the risk")
        if not isinstance(self.sites, dict) or not all(isinstance(v, str) for v in self.sites.values()):
            raise ConfigError("coordinator: sites must map site names to public key files")
        for name in self.sites:
            check_site_name(name, "coordinator: sites")

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def ca(self) -> Path | None:
        return None if self.insecure else Path(str(self.tls.ca_cert))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost"; anything else (0.0.0.0, ::, a name, a LAN address)
    may be reachable from other machines."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
