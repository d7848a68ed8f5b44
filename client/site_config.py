"""A hospital's site configuration (YAML) and what it turns into: the SuperNode's node_config.

Example (deploy/site.example.yaml)::

    site: udiat
    superlink: fl.example.org:9093      # coordinator's Fleet API, host:port
    ca_cert: /etc/fedbus/ca.crt         # the federation CA (public)
    private_key: /etc/fedbus/udiat      # this site's OpenSSH EC key (SECRET, mode 0600)
    data:
      path: /data/udiat
      format: auto
      exclude:                          # optional: cases left out, each with its reason
        - {file: masks/HESN_0001.png, reason: "mask outlines a different lesion"}
        - {file: case_017, reason: "duplicate of case_016"}   # a case id / file name stem
      skip_invalid: false               # true: train on the valid cases, log what was left out
    cache_dir: /var/cache/fedbus/udiat
    state_dir: /var/lib/fedbus/udiat
    runtime_port: 9094
    after_run: wait                     # when a run ends: wait for the next one, or exit (status 0)
    privacy:                            # optional: the hospital's own DP terms (docs/privacy.md)
      required: true                    # no DP-SGD, no training
      max_epsilon: 4.0                  # lifetime epsilon on this site's data, across runs
      min_noise_multiplier: 0.8         # sigma never below this
      delta: 1.0e-5                     # delta never above this

Relative paths are resolved against the YAML's folder. Unknown keys are errors naming the file,
so a typo cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from client.run_status import AFTER_RUN
from common.config import ConfigError, from_dict, load_yaml
from common.exclusion import Exclusion, exclusions_to_node
from common.federation import SiteSpec
from common.site_privacy import SitePrivacy


@dataclass(frozen=True)
class SiteData:
    """Where the site's images are: ``path`` read as ``format`` (a centre name, "manifest" or
    "auto"), or a synthetic centre (trials and tests only). ``exclude``: cases left out (a path
    relative to ``path``, or a case id, with the reason); ``skip_invalid``: invalid files are left
    out and listed instead of stopping the site (the default stays strict)."""

    path: str | None = None
    format: str = "auto"
    synthetic_centre: str | None = None
    synthetic_n: int = 64
    exclude: tuple[Exclusion, ...] = ()
    skip_invalid: bool = False


@dataclass(frozen=True)
class Tuning:
    """Launcher timing. ``fast``: warm ClientApp worker plus shortened polls (client/supernode.py);
    False: stock ``flower-supernode --isolation subprocess``."""

    fast: bool = True
    idle_pull_s: float = 0.5
    worker_poll_s: float = 0.25
    heartbeat_s: float | None = None  # None: Flower's 30 s; the SuperLink accepts 10..1800
    reconnect_timeout_s: float | None = 3600.0  # give up reconnecting after this (None: never)
    coordinator_gone_s: float = 60.0  # after a run ended: unreachable this long, stop the SuperNode
    coordinator_probe_s: float = 15.0  # after a run ended: how often the coordinator is checked


@dataclass(frozen=True)
class SiteConfig:
    site: str
    superlink: str = "127.0.0.1:9093"
    ca_cert: str | None = None
    private_key: str | None = None
    insecure: bool = False
    data: SiteData = field(default_factory=SiteData)
    cache_dir: str | None = None
    state_dir: str | None = None
    runtime_port: int = 9094
    device: str = "auto"
    num_threads: int | None = None
    allowed_fab_hashes: tuple[str, ...] = ()
    tuning: Tuning = field(default_factory=Tuning)
    privacy: SitePrivacy | None = None  # the site's own DP terms (common/site_privacy.py)
    after_run: str = "wait"  # when a run ends: "wait" for the next one, or "exit" 0 (client/run_status.py)

    def __post_init__(self) -> None:
        SiteSpec(name=self.site, data_path=self.data.path or None,
                 synthetic_centre=self.data.synthetic_centre)  # validates name and data choice
        if not self.insecure and (self.ca_cert is None or self.private_key is None):
            raise ConfigError(f"site {self.site}: TLS needs ca_cert and private_key "
                              "(or insecure: true, for loopback trials only)")
        if not 0 < self.runtime_port < 65536:
            raise ConfigError(f"site {self.site}: runtime_port {self.runtime_port} out of range")
        hb = self.tuning.heartbeat_s
        if hb is not None and not 10.0 <= hb <= 1800.0:  # SuperLink's accepted range (flwr 1.41)
            raise ConfigError(f"site {self.site}: tuning.heartbeat_s must be in [10, 1800], got {hb}")
        if ":" not in self.superlink:
            raise ConfigError(f"site {self.site}: superlink must be host:port, got {self.superlink!r}")
        if self.after_run not in AFTER_RUN:
            raise ConfigError(f"site {self.site}: after_run must be one of {AFTER_RUN}, got {self.after_run!r}")
        if not (self.tuning.coordinator_gone_s > 0 and self.tuning.coordinator_probe_s > 0):
            raise ConfigError(f"site {self.site}: tuning.coordinator_gone_s and coordinator_probe_s "
                              "must be > 0")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or Path.home() / ".local" / "state" / "fedbus" / self.site)

    def site_spec(self) -> SiteSpec:
        return SiteSpec(name=self.site, data_path=self.data.path, data_format=self.data.format,
                        synthetic_centre=self.data.synthetic_centre, synthetic_n=self.data.synthetic_n,
                        strict=not self.data.skip_invalid, exclude=self.data.exclude)

    def node_config(self) -> dict[str, Any]:
        """The SuperNode's node_config (client/runtime.py NODE_KEYS); None values are left out."""
        values: dict[str, Any] = {
            "site": self.site,
            "data-path": self.data.path,
            "data-format": self.data.format,
            "synthetic-centre": self.data.synthetic_centre,
            "synthetic-n": self.data.synthetic_n if self.data.synthetic_centre else None,
            "data-exclude": exclusions_to_node(self.data.exclude) if self.data.exclude else None,
            "skip-invalid": True if self.data.skip_invalid else None,
            "cache-dir": self.cache_dir,
            "state-dir": str(self.state_path),
            "device": self.device,
            "num-threads": self.num_threads,
            **(self.privacy.node_config() if self.privacy is not None else {}),
        }
        return {k: v for k, v in values.items() if v is not None}


_PATH_FIELDS = ("ca_cert", "private_key", "cache_dir", "state_dir")


def _absolute(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def site_config_from_dict(data: Mapping[str, Any], where: str, base: Path | None = None) -> SiteConfig:
    """Parse and resolve relative paths against ``base`` (default: the working directory)."""
    cfg = from_dict(SiteConfig, data, where)
    base = (base or Path.cwd()).resolve()
    changes: dict[str, Any] = {f: _absolute(base, getattr(cfg, f)) for f in _PATH_FIELDS}
    if cfg.data.path is not None:
        changes["data"] = dataclasses.replace(cfg.data, path=_absolute(base, cfg.data.path))
    return dataclasses.replace(cfg, **changes)


def load_site_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SiteConfig:
    """Read a site YAML; ``overrides`` (dotted keys, e.g. {"data.path": ...}) from the command
    line replace YAML values before validation."""
    path = Path(path)
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        if rest:
            data.setdefault(head, {})
            if not isinstance(data[head], dict):
                raise ConfigError(f"{path}: {head} must be a mapping")
            data[head][rest] = value
        else:
            data[key] = value
    try:
        return site_config_from_dict(data, str(path), path.resolve().parent)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(str(path)) else f"{path}: {text}") from None
