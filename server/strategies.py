"""The federation's strategies: Flower's aggregation (``flwr.serverapp.strategy``) under the
``SiteAware`` mixin of server/strategy.py, and ``build_strategy`` from the federation settings.
Server optimisers (FedAdam, FedAvgM) change the aggregate in ``_server_step``; they step
parameters only, buffers (running statistics, counters) keep the num-examples-weighted mean."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Strategy

from common.federation import FederationConfig
from common.fedmetrics import aggregate_site_metrics
from common.screening import RejectionStreaks, ScreenLimits
from server.registry import SiteRegistry
from server.strategy import Recorder, SiteAware


def _weighted_mean(replies: list[Message], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """{key: the num-examples-weighted mean of the replies' arrays} (what FedAvg gives them)."""
    weights = np.array([float(m.content["metrics"]["num-examples"]) for m in replies])  # type: ignore[index]
    out: dict[str, np.ndarray] = {}
    for key in keys:
        stacked = np.stack([m.content["arrays"][key].numpy().astype(np.float64) for m in replies])  # type: ignore[index]
        out[key] = np.tensordot(weights / weights.sum(), stacked, axes=1)
    return out


def _metrics_fn(phase: str) -> Callable[[list[RecordDict], str], MetricRecord]:
    """Flower's metric aggregation replaced by the count-weighted pooling of common/fedmetrics."""

    def aggregate(records: list[RecordDict], _weight_key: str) -> MetricRecord:
        per_site = {str(i): {k: float(v) for k, v in r["metrics"].items()} for i, r in enumerate(records)}  # type: ignore[arg-type]
        return MetricRecord(aggregate_site_metrics(per_site, phase))

    return aggregate


class SiteFedAvg(SiteAware, FedAvg):
    """FedAvg (McMahan et al. 2017), weighted by num-examples."""


class SiteFedNova(SiteAware, FedAvg):
    """FedNova (Wang et al. 2020): FedAvg of each site's update divided by its local steps and
    rescaled by their weighted mean (server/part_weights.py), so a site that took more steps does
    not pull the model past its share of the data."""


class SiteFedProx(SiteAware, FedProx):
    """FedProx: FedAvg aggregation; the sites add (μ/2)·||w − w_global||² (config proximal-mu)."""


class SiteFedAdam(SiteAware, FedAdam):
    """FedAdam (Reddi et al. 2021): server Adam step on the averaged update; m, v checkpointed.
    Buffers (running statistics, counters) take the plain mean instead of Flower's Adam step."""

    def _server_step(self, merged: dict[str, np.ndarray], replies: list[Message]) -> None:
        for key, mean in _weighted_mean(replies, self.buffer_keys & self.current.keys()).items():
            merged[key] = mean.astype(self.current[key].dtype, copy=False)


class SiteFedAvgM(SiteAware, FedAvg):
    """FedAvgM (Hsu et al. 2019): server momentum on the averaged update Δ = w − mean(w_site):
    m ← β·m + Δ, w ← w − m (server learning rate 1). Parameters only: buffers (running
    statistics, counters) keep the plain mean, as under FedAvg. Flower's FedAvgM pairs arrays by
    position and keeps its own copy of the weights; this one pairs them by name with the weights
    sent, and ``m`` is checkpointed. Measured at β 0.9 it overshoots (RESULTS.md §2)."""

    def __init__(self, *args: Any, server_momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_momentum = float(server_momentum)
        self.momentum: dict[str, np.ndarray] = {}

    def _server_step(self, merged: dict[str, np.ndarray], replies: list[Message]) -> None:
        for key, mean in merged.items():
            old = self.current[key]
            if key in self.buffer_keys or not np.issubdtype(old.dtype, np.floating):
                continue  # statistics and counters keep the mean: momentum would overshoot them
            delta = old - mean
            previous = self.momentum.get(key)
            m = delta if previous is None else self.server_momentum * previous + delta
            self.momentum[key] = m
            merged[key] = (old - m).astype(old.dtype, copy=False)


class SiteFedMedian(SiteAware, FedMedian):
    """Coordinate-wise median of the site weights (robust to one outlying site)."""


class SiteFedBN(SiteAware, FedAvg):
    """FedBN (Li et al. 2021): sites keep their normalisation layers; the rest is FedAvg.
    The global model's norm layers stay at their initial values (GroupNorm: identity affine)."""


_CLASSES: dict[str, type] = {
    "fedavg": SiteFedAvg, "fednova": SiteFedNova, "fedprox": SiteFedProx, "fedadam": SiteFedAdam,
    "fedavgm": SiteFedAvgM, "fedmedian": SiteFedMedian, "fedbn": SiteFedBN,
}


def build_strategy(
    fed: FederationConfig,
    *,
    registry: SiteRegistry,
    recorder: Recorder,
    seed: int,
    norm_keys: frozenset[str] = frozenset(),
    buffer_keys: frozenset[str] = frozenset(),
    batch_size: int = 1,
) -> Strategy:
    """The configured strategy; ``norm_keys`` (common.federation.norm_keys) for FedBN,
    ``buffer_keys`` (common.federation.buffer_keys): what FedAdam's and FedAvgM's server steps and
    FedNova's step normalisation leave to the plain mean; ``batch_size`` (train.batch_size):
    FedNova counts each site's local steps from it and the site's num-examples."""
    common: dict[str, Any] = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        # at least min_sites per round when that many are connected; unlike stock FedAvg these
        # are never waited for here (the round loop waits for the quorum, boundedly)
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        train_metrics_aggr_fn=_metrics_fn("train"),
        evaluate_metrics_aggr_fn=_metrics_fn("evaluate"),
    )
    if fed.strategy == "fedprox":
        common["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        common["eta"] = fed.server_lr
    if fed.strategy == "fedavgm":
        common["server_momentum"] = fed.server_momentum
    strategy = _CLASSES[fed.strategy](**common)
    strategy.attach(registry, recorder, seed, packed=fed.packed_weights)
    strategy.limits = ScreenLimits(fed.screen_norm_factor, fed.screen_norm_cap)
    strategy.streaks = RejectionStreaks(fed.drop_after_rejections)
    if fed.strategy == "fedbn":
        strategy.norm_keys = frozenset(norm_keys)
    strategy.buffer_keys = frozenset(buffer_keys)
    # a weighted mean only, and not where the server clips each update for client-level DP
    strategy.part_weights = fed.strategy != "fedmedian" and not fed.client_dp.enabled
    if fed.strategy == "fednova":
        strategy.step_batch = int(batch_size)
    return strategy
