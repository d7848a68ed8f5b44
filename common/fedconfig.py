"""Federation settings: rounds, strategy, quorum and timeouts, update screening, client-level DP
and SecAgg+ (the ``federation:`` section of a settings document)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.configtools import ConfigError, _need, _nonneg, _one_of, from_dict

STRATEGIES: tuple[str, ...] = ("fedavg", "fednova", "fedprox", "fedbn", "fedadam", "fedavgm", "fedmedian")
#: Strategies whose aggregate is a weighted mean of complete updates: all a masked sum (SecAgg+)
#: yields, and what client-level DP's noise σ·C/n is calibrated for.
MEAN_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
#: Client-level DP modes of server/dp.py (fixed clipping only: Flower's adaptive clipping would
#: clip replies before the server's update screening and add a reply metric outside the schema).
CLIENT_DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed")


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level (central) DP with Flower's wrappers (server/dp.py): each site's update
    clipped to ``clipping_norm``, Gaussian noise σ·C/n added to the mean of n sites; ``delta``
    only for reporting ε."""

    mode: str = "off"  # one of CLIENT_DP_MODES ("server-fixed": the server clips each update)
    noise_multiplier: float = 1.0  # σ
    clipping_norm: float = 1.0  # C: bound on ||w_site − w_global||
    delta: float = 1e-3  # δ of the reported client-level ε

    def __post_init__(self) -> None:
        _one_of("client_dp.mode", self.mode, CLIENT_DP_MODES)
        _nonneg("client_dp", self, "noise_multiplier")
        _need(math.isfinite(self.clipping_norm) and self.clipping_norm > 0, "client_dp.clipping_norm",
              "must be a finite number > 0", self.clipping_norm)
        _need(0.0 < self.delta < 1.0, "client_dp.delta", "must lie in (0, 1)", self.delta)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def client_side(self) -> bool:
        """Whether the sites clip (client/client_dp.py's own mod, when the round asks)."""
        return self.mode.startswith("client-")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, where: str = "client_dp") -> "ClientDPConfig":
        """From a mapping with dashed (run-config) or underscored keys."""
        return from_dict(cls, {str(k).replace("-", "_"): v for k, v in (data or {}).items()}, where)


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (server/secagg_app.py, ``flwr.server.workflow.SecAggPlusWorkflow``): the server
    learns only the weighted mean of the site updates. Floats for ``num_shares`` /
    ``reconstruction_threshold`` are fractions of the sampled sites / of the shares; any
    ``reconstruction_threshold`` sites colluding with the server can unmask one site's update."""

    enabled: bool = False  # run the federation's rounds under SecAgg+
    num_shares: int | float = 1.0  # shares of each site's mask secrets (1.0: all sampled sites)
    reconstruction_threshold: int | float = 0.67  # shares needed to unmask a dropped site
    clipping_range: float = 1.0  # scaled update values are clipped to ± this before quantisation
    quantization_range: int = 2**22  # quantisation levels over [−clipping_range, clipping_range]
    modulus_range: int = 2**32  # the masked sum's modulus
    max_weight: float = 1000.0  # most training images a site may have (its weight's scale)
    timeout_s: float = 600.0  # deadline of each SecAgg+ stage

    def __post_init__(self) -> None:
        for name in ("clipping_range", "max_weight", "timeout_s"):
            v = getattr(self, name)
            _need(math.isfinite(v) and v > 0, f"secagg.{name}", "must be a finite number > 0", v)
        _need(0 < self.quantization_range < self.modulus_range, "secagg.quantization_range",
              "must lie in (0, modulus_range)", self.quantization_range)
        _need(self.modulus_range & (self.modulus_range - 1) == 0, "secagg.modulus_range",
              "must be a power of 2", self.modulus_range)
        shares, threshold = self.num_shares, self.reconstruction_threshold
        _need((shares == 1 or shares > 2) if isinstance(shares, int) else (0 < shares <= 1),
              "secagg.num_shares", "must be an integer > 2 (or 1), or a fraction in (0, 1]", shares)
        _need((threshold >= 1) if isinstance(threshold, int) else (0 < threshold <= 1),
              "secagg.reconstruction_threshold", "must be an integer >= 1 or a fraction in (0, 1]", threshold)
        if isinstance(shares, int) and isinstance(threshold, int) and shares > 2:
            _need(threshold < shares, "secagg.reconstruction_threshold",
                  f"must be less than num_shares ({shares})", threshold)


@dataclass(frozen=True)
class FederationConfig:
    """Round structure and aggregation. ``proximal_mu`` only acts with strategy "fedprox";
    ``server_lr`` only with "fedadam", ``server_momentum`` only with "fedavgm"; ``min_sites`` is the
    quorum below which no round starts."""

    rounds: int = 3  # server rounds; rounds × local_epochs is the run's epoch budget
    local_epochs: int = 1  # epochs each site trains per round
    strategy: str = "fedavg"  # one of STRATEGIES, the same in simulation and deployment
    proximal_mu: float = 0.01  # FedProx μ
    fraction_train: float = 1.0  # share of the connected sites asked to train each round
    fraction_evaluate: float = 1.0  # share asked to evaluate
    min_sites: int = 2  # quorum: no round starts with fewer connected sites
    round_timeout_s: float = 600.0  # deadline for one round's replies; late sites are left out
    quorum_timeout_s: float = 300.0  # how long a round waits for the quorum before the run stops
    server_lr: float = 0.01  # FedAdam's server learning rate
    server_momentum: float = 0.9  # FedAvgM's β: m ← β·m + Δ, w ← w − m (Hsu et al. 2019)
    central_eval: bool = True  # the server also scores the run's central test centres each round
    checkpoint_every: int = 1  # rounds between checkpoints
    packed_weights: bool = True  # one float32 vector per message (common/packing.py)
    screen_norm_factor: float = 10.0  # reject an update whose ||w_site − w_global|| exceeds this × the round's median
    screen_norm_cap: float | None = None  # absolute bound on that norm (None: only the relative bound)
    drop_after_rejections: int = 3  # a site rejected this many rounds running is no longer sampled
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)  # client-level DP (server/dp.py)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)  # secure aggregation (server/secagg_app.py)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"federation.strategy: {self.strategy!r} not one of {STRATEGIES}")
        for name in ("rounds", "local_epochs", "min_sites", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"federation.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"federation.{name}: must be in (0, 1], got {getattr(self, name)}")
        for name in ("round_timeout_s", "quorum_timeout_s", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"federation.{name}: must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"federation.server_momentum: must lie in [0, 1), got {self.server_momentum}")
        if self.proximal_mu < 0:
            raise ConfigError(f"federation.proximal_mu: must be >= 0, got {self.proximal_mu}")
        if not self.screen_norm_factor >= 1.0:  # below 1 even the median site's update is rejected
            raise ConfigError(f"federation.screen_norm_factor: must be >= 1, got {self.screen_norm_factor}")
        if self.screen_norm_cap is not None and not self.screen_norm_cap > 0:
            raise ConfigError(f"federation.screen_norm_cap: must be > 0 or null, got {self.screen_norm_cap}")
        if self.drop_after_rejections < 1:
            raise ConfigError(f"federation.drop_after_rejections: must be >= 1, got {self.drop_after_rejections}")
        _check_private_aggregation(self)


def _check_private_aggregation(fed: FederationConfig) -> None:
    """Refuse the combinations client-level DP and SecAgg+ cannot run with, naming the reason."""
    dp, secagg = fed.client_dp, fed.secagg
    if dp.enabled and secagg.enabled:
        raise ConfigError("federation.client_dp and federation.secagg: not both at once (Flower 1.41's DP "
                          "wrappers are Message-API strategies, SecAgg+ a legacy workflow; and server-side "
                          "clipping needs the individual updates SecAgg+ hides)")
    if secagg.enabled and fed.strategy not in MEAN_STRATEGIES:
        raise ConfigError(f"federation.secagg: strategy {fed.strategy!r} cannot run under SecAgg+, which "
                          "yields only the weighted mean of complete updates (fedbn withholds layers, "
                          f"fednova/fedadam/fedavgm/fedmedian need more than a mean); use one of {list(MEAN_STRATEGIES)}")
    if not dp.enabled:
        return
    if fed.strategy not in MEAN_STRATEGIES:
        raise ConfigError(f"federation.client_dp: strategy {fed.strategy!r} cannot run with client-level DP: "
                          "the noise σ·C/n is calibrated for a mean of clipped updates of all sent arrays "
                          f"(fedbn withholds layers, fednova/fedadam/fedavgm/fedmedian are not a mean); use one of "
                          f"{list(MEAN_STRATEGIES)}")
    if fed.packed_weights:
        raise ConfigError("federation.client_dp: needs federation.packed_weights: false (the DP wrappers "
                          "and clipping mods compare the update with the global weights tensor by tensor)")
