"""A hospital's own privacy terms (the ``privacy:`` section of its site YAML) and the plan it
trains under: the coordinator's request, never more than the site allows.

The coordinator sends its DP-SGD settings with the experiment; a site with terms combines them
(``effective_privacy``) before each round:
- ``required``: no DP, no training (a request with ``enabled: false`` is refused);
- ``max_epsilon``: the site's lifetime ε on its data, across runs (its accountant file is one per
  site): the budget is min(site cap, coordinator's ``target_epsilon``), so σ is planned for the
  smaller ε and a round that would pass the site's cap is refused;
- ``min_noise_multiplier``: σ never below it (a larger σ only lowers ε);
- ``delta``: δ never above it.
Framework-free (no torch, no flwr): the launcher parses it, the ClientApp enforces it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from common.config import ConfigError, PrivacyConfig

log = logging.getLogger(__name__)

#: node_config keys that carry the terms from flower-client to the ClientApp (the only door).
NODE_KEYS = ("privacy-required", "privacy-max-epsilon", "privacy-min-noise-multiplier", "privacy-delta")


class SitePrivacyRefused(RuntimeError):
    """The site's privacy terms forbid this round; nothing was trained. ``reason`` is short and
    holds no paths (it is what leaves the site)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class SitePrivacy:
    """The site's terms; a site YAML with a ``privacy:`` section requires DP unless it says
    ``required: false`` (then the caps apply only when the coordinator runs DP)."""

    required: bool = True
    max_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_epsilon", "min_noise_multiplier"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"privacy.{name}: must be > 0 (or left out), got {v!r}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta: must lie in (0, 1), got {self.delta!r}")

    def node_config(self) -> dict[str, Any]:
        """The terms as node_config values (None left out)."""
        values = {"privacy-required": self.required, "privacy-max-epsilon": self.max_epsilon,
                  "privacy-min-noise-multiplier": self.min_noise_multiplier,
                  "privacy-delta": self.delta}
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SitePrivacy | None":
        """The terms a SuperNode was started with (None: the site set none)."""
        if not any(k in node_config for k in NODE_KEYS):
            return None

        def num(key: str) -> float | None:
            v = node_config.get(key)
            return None if v in (None, "") else float(v)

        required = node_config.get("privacy-required", True)
        if not isinstance(required, bool):
            raise ConfigError(f"node_config privacy-required: must be true or false, got {required!r}")
        return cls(required=required, max_epsilon=num("privacy-max-epsilon"),
                   min_noise_multiplier=num("privacy-min-noise-multiplier"), delta=num("privacy-delta"))


def effective_privacy(terms: SitePrivacy | None, requested: PrivacyConfig, site: str) -> PrivacyConfig:
    """The plan this site trains under: ``requested`` (the coordinator's) within ``terms``.
    Raises ``SitePrivacyRefused`` when the site requires DP and the request turns it off."""
    if terms is None:
        return requested
    if not requested.enabled:
        if terms.required:
            raise SitePrivacyRefused(
                "the site requires DP-SGD; the coordinator sent privacy.enabled: false",
                f"site {site}: refusing to train: the site's privacy terms require DP-SGD and the "
                "coordinator's experiment has privacy.enabled: false")
        log.warning("site %s: the coordinator runs without DP-SGD (the site allows it: required: false)", site)
        return requested
    changes: dict[str, Any] = {}
    if terms.max_epsilon is not None:
        asked = requested.target_epsilon
        if asked is None or asked > terms.max_epsilon:
            log.warning("site %s: the coordinator asks for eps %s; the site allows at most %g, "
                        "which is the budget", site, asked if asked is not None else "without a cap",
                        terms.max_epsilon)
            changes["target_epsilon"] = float(terms.max_epsilon)
    if terms.delta is not None and requested.target_delta > terms.delta:
        changes["target_delta"] = float(terms.delta)
    floor = terms.min_noise_multiplier
    if floor is not None and requested.noise_multiplier is not None and requested.noise_multiplier < floor:
        changes["noise_multiplier"] = float(floor)
    return dataclasses.replace(requested, **changes) if changes else requested


def check_site_cap(terms: SitePrivacy | None, predicted_epsilon: float, spent_epsilon: float,
                   site: str) -> None:
    """Refuse a round whose predicted cumulative ε passes the site's own cap (before any step)."""
    if terms is None or terms.max_epsilon is None or predicted_epsilon <= terms.max_epsilon:
        return
    raise SitePrivacyRefused(
        f"the site's privacy budget (max eps {terms.max_epsilon:g}) would be exceeded",
        f"site {site}: refusing to train: spent eps={spent_epsilon:.3f} of the site's lifetime "
        f"budget max_epsilon={terms.max_epsilon:g}; this round would reach eps={predicted_epsilon:.3f}. "
        "Only the data owner can raise privacy.max_epsilon in the site YAML.")
