"""Client-level (central) DP: Flower's strategy wrappers, built from a config dataclass.

Client-level DP protects the *whole update of one site* (was hospital X in the federation, and
what did its data change?), not one patient; it is the complement of sample-level DP-SGD
(common/privacy.py). Flower 1.41 offers four wrappers (``flwr.serverapp.strategy``):

| mode | clipping | site side |
|---|---|---|
| ``server-fixed`` | server clips each update (reply − global) to ``clipping_norm`` | nothing |
| ``client-fixed`` | sites clip before sending | ``fixedclipping_mod`` in the ClientApp |
| ``server-adaptive`` | server clips; norm follows the ``target_clipped_quantile`` | nothing |
| ``client-adaptive`` | sites clip; norm adapted from noisy clipped counts | ``adaptiveclipping_mod`` |

Gaussian noise of stdev σ·C/num_sampled_clients is added to the aggregate. Constraints (read the
code of flwr 1.41, ``serverapp/strategy/dp_*_clipping.py``):
- **Any error reply skips the round's aggregation** (the global model stays unchanged). A site
  that fails, or refuses to train because its DP-SGD budget is spent, stalls every DP round.
- The noise assumes **num_sampled_clients replies of equal weight**. FedAvg weights by
  num-examples, so the largest site's update has sensitivity w_max·C/Σw, not C/n: its real noise
  multiplier is σ·mean(w)/max(w) (``effective_noise_multiplier``; ``client_level_epsilon`` uses
  it). Fewer replies than configured also mean less noise than the guarantee needs.
- The client-side mods need exactly one ArrayRecord and one ConfigRecord in the message and
  **reply array keys identical to the sent keys**: no FedBN (sites withhold norm layers).
- The wrappers compare reply and sent arrays key by key, so weights must travel per tensor:
  ``federation.packed_weights: false`` (common/packing.py).
- Adaptive clipping spends part of σ on the clipped-count query: with the default
  ``clipped_count_stddev = n/20`` and our 3–4 sites, any σ ≥ 2·n/20 (0.3 for 3 sites) is refused;
  give ``clipped_count_stddev`` explicitly.
- With a handful of hospitals the noise σ·C/n per coordinate swamps the averaged update; the mode
  exists for completeness and for federations with many sites (docs/privacy.md).
- Flower's own accountant (``flwr.serverapp.PrivacyConfig``) needs ``flwr[dp]``
  (dp-accounting), which this environment lacks; ``client_level_epsilon`` accounts with Opacus'
  RDP accountant instead (Gaussian mechanism, sampling q = sampled/total sites per round).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.config import ConfigError, from_dict
from common.privacy import epsilon_of

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level DP settings (YAML section or run-config mapping, see ``from_mapping``).
    ``clipping_norm`` is used by the fixed modes; ``initial_clipping_norm``,
    ``target_clipped_quantile``, ``clip_norm_lr`` and ``clipped_count_stddev`` by the adaptive
    ones; ``delta`` only for reporting ε."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"client_dp.mode: {self.mode!r} not one of {MODES}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"client_dp.noise_multiplier: must be >= 0, got {self.noise_multiplier}")
        for name in ("clipping_norm", "initial_clipping_norm", "clip_norm_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"client_dp.{name}: must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.target_clipped_quantile <= 1.0:
            raise ConfigError(f"client_dp.target_clipped_quantile: must be in [0, 1]")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"client_dp.delta: must be in (0, 1), got {self.delta}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def client_side(self) -> bool:
        """Whether sites must run the matching clipping mod (``client_mod_name``)."""
        return self.mode.startswith("client-")

    @property
    def client_mod_name(self) -> str | None:
        """The ``flwr.clientapp.mod`` the sites need, or None."""
        if self.mode == "client-fixed":
            return "fixedclipping_mod"
        if self.mode == "client-adaptive":
            return "adaptiveclipping_mod"
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, where: str = "client_dp") -> "ClientDPConfig":
        """From a mapping with dashed (run-config) or underscored keys."""
        return from_dict(cls, {str(k).replace("-", "_"): v for k, v in (data or {}).items()}, where)


class _Delegating:
    """Attributes the DP wrapper lacks (``state_dict``, ``last_site_metrics`` ...) come from the
    wrapped strategy, so server code written for our strategies keeps working when wrapped."""

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("strategy")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)


class ServerFixed(_Delegating, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientFixed(_Delegating, DifferentialPrivacyClientSideFixedClipping):
    pass


class ServerAdaptive(_Delegating, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class ClientAdaptive(_Delegating, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


def wrap_client_dp(strategy: Strategy, cfg: ClientDPConfig, num_sampled_clients: int,
                   *, fedbn: bool = False) -> Strategy:
    """``strategy`` wrapped for client-level DP per ``cfg`` (unchanged when mode is "off").

    ``num_sampled_clients``: sites asked to train each round (the noise is calibrated for
    exactly that many equally weighted replies). ``fedbn=True`` with a client-side mode is
    refused: the clipping mods need the reply to carry every sent array key.
    """
    if not cfg.enabled:
        return strategy
    if num_sampled_clients < 1:
        raise ConfigError(f"client_dp: num_sampled_clients must be >= 1, got {num_sampled_clients}")
    if fedbn and cfg.client_side:
        raise ConfigError(f"client_dp.mode {cfg.mode!r}: the client clipping mods need identical "
                          "sent/reply array keys, which FedBN (site-local norm layers) breaks")
    if cfg.mode in ("server-fixed", "client-fixed"):
        cls = ServerFixed if cfg.mode == "server-fixed" else ClientFixed
        wrapped: Strategy = cls(strategy, cfg.noise_multiplier, cfg.clipping_norm, num_sampled_clients)
    else:
        cls_a = ServerAdaptive if cfg.mode == "server-adaptive" else ClientAdaptive
        try:
            wrapped = cls_a(strategy, cfg.noise_multiplier, num_sampled_clients,
                            initial_clipping_norm=cfg.initial_clipping_norm,
                            target_clipped_quantile=cfg.target_clipped_quantile,
                            clip_norm_lr=cfg.clip_norm_lr,
                            clipped_count_stddev=cfg.clipped_count_stddev)
        except ValueError as exc:
            raise ConfigError(f"client_dp ({cfg.mode}): {exc}") from exc
    log.info("client-level DP: %s, noise multiplier %g, %d sites per round%s", cfg.mode,
             cfg.noise_multiplier, num_sampled_clients,
             f"; sites must run {cfg.client_mod_name}" if cfg.client_side else "")
    return wrapped


def effective_noise_multiplier(noise_multiplier: float, weights: Sequence[float] | None) -> float:
    """σ that the most heavily weighted site actually gets under weighted FedAvg:
    σ·mean(w)/max(w) (= σ for equal weights)."""
    if not weights:
        return float(noise_multiplier)
    w = [float(x) for x in weights]
    if min(w) <= 0:
        raise ValueError(f"weights must be > 0, got {w}")
    return float(noise_multiplier) * (sum(w) / len(w)) / max(w)


def client_level_epsilon(cfg: ClientDPConfig, rounds: int, num_sampled_clients: int,
                         num_sites: int, weights: Sequence[float] | None = None) -> float:
    """ε at ``cfg.delta`` for one site's participation after ``rounds`` noised aggregations
    (RDP of the sampled Gaussian mechanism, q = sampled/total sites; the effective σ of the
    heaviest site). inf when the mode is off or σ = 0."""
    if not cfg.enabled or rounds <= 0:
        return 0.0 if rounds <= 0 else float("inf")
    q = min(1.0, num_sampled_clients / max(num_sites, 1))
    sigma = effective_noise_multiplier(cfg.noise_multiplier, weights)
    return epsilon_of([[sigma, q, int(rounds)]], cfg.delta, "rdp")
