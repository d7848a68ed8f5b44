"""Client-level (central) DP: Flower's strategy wrappers around our strategies, from
``federation.client_dp`` (common/config.py ``ClientDPConfig``).

Client-level DP protects the *whole update of one site* (was hospital X in the federation, and
what did its data change?), not one patient; it is the complement of sample-level DP-SGD
(common/privacy.py). Flower 1.41's fixed-clipping wrappers (``flwr.serverapp.strategy``):

| mode | clipping | site side |
|---|---|---|
| ``server-fixed`` | server clips each update (reply − global) to ``clipping_norm`` | nothing |
| ``client-fixed`` | sites clip before sending (and the server clips again) | client/client_dp.py ``client_dp_mod`` (Flower's ``fixedclipping_mod`` with common/clipping.py), when the round asks |

Flower's adaptive-clipping wrappers are not offered: they clip replies before the server's update
screening, and ``client-adaptive`` adds a reply metric outside the fixed schema. Our subclasses
replace Flower's clipping by common/clipping.py
(arrays paired by name, 0-d arrays clipped too, no division by a zero norm: Flower's misses the
0-d prior counter) and leave a malformed reply unclipped for the strategy's screening to reject. Each
released round records σ, C, the noise stdev, the number of updates, the effective σ and the
cumulative client-level ε as ``client_dp_*`` metric rows of the aggregate site.

Gaussian noise of stdev σ·C/num_sampled_clients is added to the aggregate. Constraints (flwr
1.41, ``serverapp/strategy/dp_*_clipping.py``):
- **Any error reply voids the round's release** (Flower's rule, kept: the noise is calibrated for
  every sampled site); the failed sites are still named, and the round loop stops the run
  keeping its last checkpoint (server/app.py).
- The noise assumes num_sampled_clients replies of equal weight. Weighted FedAvg gives the
  heaviest site sensitivity C·max(w)/Σw, i.e. an effective σ·Σw/(n·max w)
  (``effective_noise_multiplier``; rejected updates lower it further); ε is accounted with it.
- Weights travel per tensor (``federation.packed_weights: false``); not with FedBN, FedAdam,
  FedAvgM or FedMedian (config validation).
- Flower's own accountant needs ``flwr[dp]``, which this environment lacks;
  ``client_level_epsilon`` accounts with Opacus' RDP accountant instead (Gaussian mechanism,
  sampling q = sampled/total sites per round).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.accounting import epsilon_of
from common.clipping import clip_update
from common.config import CLIENT_DP_MODES, ClientDPConfig, ConfigError, FederationConfig
from common.federation import AGGREGATE_SITE

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = CLIENT_DP_MODES
__all__ = [
    "MODES",
    "ClientDPConfig",
    "client_level_epsilon",
    "clip_reply",
    "effective_noise_multiplier",
    "planned_sampled_sites",
    "wrap_client_dp",
]


def planned_sampled_sites(fed: FederationConfig, num_sites: int) -> int:
    """Sites asked to train each round when all ``num_sites`` are connected (the selection rule
    of server/strategy.py ``SiteAware.select``): the n the noise is calibrated for."""
    return min(num_sites, max(fed.min_sites, math.floor(fed.fraction_train * num_sites)))


def clip_reply(arrays: ArrayRecord, current: Mapping[str, np.ndarray], clipping_norm: float) -> ArrayRecord | None:
    """A train reply's weights with the update clipped to ``clipping_norm`` (common/clipping.py:
    by name, 0-d arrays included); None when the reply cannot be clipped (other names or shapes,
    a non-finite update): such a reply is left for the screening to reject."""
    try:
        reply = {k: a.numpy() for k, a in arrays.items()}
    except Exception:  # noqa: BLE001 - a hostile reply may hold anything
        return None
    clipped = clip_update(reply, current, clipping_norm)
    return None if clipped is None else ArrayRecord({k: Array(v) for k, v in clipped[0].items()})


class _Delegating:
    """Attributes the DP wrapper lacks (``last_failures``, ``registry`` ...) come from the
    wrapped strategy, so server code written for our strategies keeps working when wrapped."""

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("strategy")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)


class _Released(_Delegating):
    """Fixed clipping by name on the server, Flower's noise, and a record of every release.
    Mixed in before a Flower fixed-clipping wrapper (it supplies ``strategy``, ``clipping_norm``,
    ``noise_multiplier``, ``num_sampled_clients`` and ``_add_noise_to_aggregated_arrays``)."""

    num_sites: int
    delta: float
    history: list[float]  # effective σ of each released round, in round order

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if any(m.has_error() for m in replies):
            return self._void(server_round, replies)
        unclipped = 0
        for reply in replies:
            clipped = clip_reply(reply.content["arrays"], self.sent, self.clipping_norm) \
                if "arrays" in reply.content.array_records else None
            if clipped is None:
                unclipped += 1  # the strategy's screening rejects it by name
            else:
                reply.content["arrays"] = clipped
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)  # type: ignore[attr-defined]
        if arrays is None:
            return None, metrics
        arrays = self._add_noise_to_aggregated_arrays(arrays)  # type: ignore[attr-defined]
        self._record(server_round, unclipped)
        return arrays, metrics

    def _void(self, server_round: int, replies: list[Message]) -> tuple[None, None]:
        """Flower's rule: an error reply voids the release. The strategy still screens the
        replies, so every failed site is named in the metrics and in the stop message."""
        screen = getattr(self.strategy, "_screen", None)  # type: ignore[attr-defined]
        if screen is not None:
            screen(server_round, "train", replies)
        failed = sum(m.has_error() for m in replies)
        log.error("round %d: client-level DP releases no update: %d of %d sites failed, and the noise is "
                  "calibrated for all %d", server_round, failed, len(replies), self.num_sampled_clients)  # type: ignore[attr-defined]
        return None, None

    def _record(self, server_round: int, unclipped: int) -> None:
        sigma, clip, n = self.noise_multiplier, self.clipping_norm, self.num_sampled_clients  # type: ignore[attr-defined]
        per_site = getattr(self.strategy, "last_site_metrics", {}).get("train", {})  # type: ignore[attr-defined]
        weights = [float(m["num-examples"]) for m in per_site.values() if m.get("num-examples", 0) > 0]
        eff = sigma * sum(weights) / (n * max(weights)) if weights else float(sigma)
        del self.history[server_round - 1:]  # a resumed round replaces its earlier record
        self.history.extend([eff] * (server_round - len(self.history)))  # rounds before a resume: assume the same
        q = min(1.0, n / max(self.num_sites, 1))
        eps = epsilon_of([[s, q, 1] for s in self.history], self.delta, "rdp")
        rows = {"client_dp_noise_multiplier": sigma, "client_dp_clipping_norm": clip,
                "client_dp_noise_std": sigma * clip / n, "client_dp_updates": float(len(per_site)),
                "client_dp_effective_sigma": eff, "client_dp_epsilon": eps}
        recorder = getattr(self.strategy, "recorder", None)  # type: ignore[attr-defined]
        if recorder is not None:
            for key, value in rows.items():
                recorder(server_round, "train", AGGREGATE_SITE, key, float(value))
        if len(per_site) < n:
            log.warning("round %d: client-level DP: %d updates aggregated, the noise is calibrated for %d "
                        "(effective σ %.3g)", server_round, len(per_site), n, eff)
        if unclipped:
            log.warning("round %d: %d malformed update(s) could not be clipped (rejected by the screening)",
                        server_round, unclipped)
        log.info("round %d: client-level DP noise stdev %.4g (σ %g, C %g, %d sites), client-level ε %.3g "
                 "at δ %g so far", server_round, sigma * clip / n, sigma, clip, n, eps, self.delta)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state, plus the effective σ of the released rounds (ε on resume)."""
        out = dict(self.strategy.state_dict())  # type: ignore[attr-defined]
        if self.history:
            out["client_dp"] = {"effective_sigma": [float(s) for s in self.history]}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("client_dp", None) or {}
        self.history = [float(s) for s in saved.get("effective_sigma", [])]
        self.strategy.load_state_dict(state)  # type: ignore[attr-defined]


class ServerFixed(_Released, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientFixed(_Released, DifferentialPrivacyClientSideFixedClipping):
    """The sites clip (``clipping_norm`` in the round's config); the server clips again, a no-op
    for an honest site, so a modified site cannot exceed C."""


def wrap_client_dp(strategy: Strategy, cfg: ClientDPConfig, num_sampled_clients: int,
                   *, fedbn: bool = False, num_sites: int | None = None) -> Strategy:
    """``strategy`` wrapped for client-level DP per ``cfg`` (unchanged when mode is "off").

    ``num_sampled_clients``: sites asked to train each round (the noise is calibrated for
    exactly that many equally weighted replies); ``num_sites``: all sites of the run (the
    sampling rate of the ε accounting; default: the sampled ones). ``fedbn=True`` with a
    client-side mode is refused: the clipping mods need the reply to carry every sent array key.
    """
    if not cfg.enabled:
        return strategy
    if num_sampled_clients < 1:
        raise ConfigError(f"client_dp: num_sampled_clients must be >= 1, got {num_sampled_clients}")
    if fedbn and cfg.client_side:
        raise ConfigError(f"client_dp.mode {cfg.mode!r}: the client clipping mods need identical "
                          "sent/reply array keys, which FedBN (site-local norm layers) breaks")
    cls = ServerFixed if cfg.mode == "server-fixed" else ClientFixed
    wrapped: Strategy = cls(strategy, cfg.noise_multiplier, cfg.clipping_norm, num_sampled_clients)
    wrapped.num_sites, wrapped.delta, wrapped.history = num_sites or num_sampled_clients, cfg.delta, []
    wrapped.sent = {}
    log.info("client-level DP: %s, noise multiplier %g, clipping norm %g, %d sites per round%s", cfg.mode,
             cfg.noise_multiplier, cfg.clipping_norm, num_sampled_clients,
             "; sites clip their updates (client/client_dp.py)" if cfg.client_side else "")
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
