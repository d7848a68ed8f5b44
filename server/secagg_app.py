"""SecAgg+ mode, server side: legacy FedAvg inside ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``.

Secure aggregation (Bell et al. 2020, SecAgg+) lets the server learn only the weighted **sum**
of the site updates, never one site's update: sites add pairwise masks that cancel in the sum,
and secret-share their mask seeds so the sum can still be unmasked when some sites drop out.
Flower 1.41 has it only for the legacy Strategy API (flower-1.41 notes §1.7), so this app is a
separate mode next to server/app.py: no site-name query, no quorum wait, no resume, no FedBN /
FedAdam / FedMedian (a masked sum supports the mean only; FedProx works, the sites add the
term). Compatibility with DP: sample-level DP-SGD at the sites — yes; Flower's client-level DP
wrappers — no (Message-API strategies; server-side clipping would need the individual updates
SecAgg hides).

Sites send scaled updates (client/secagg_app.py); this strategy adds the securely averaged
update back to the global weights: w ← w + mean_i(u_i·s)/s, weighted by num-examples. Error of
the secure mean per value: about n·(2·clipping_range/quantization_range)/Σ(n_i/max_weight) in
scaled units (stochastic rounding of each site's share, after the weighting by n_i/max_weight),
so ``max_weight`` should be close to the largest site's training-set size.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import ConfigError, from_dict, to_dict
from common.federation import AGGREGATE_SITE, RunSpec, build_experiment_model
from launch.wire import KEY_MAX_WEIGHT, KEY_RANGE, KEY_SCALES, SECAGG_STRATEGIES
from server.app import CentralTest, resolve_server_spec
from server.state import MetricRow, ServerRunFolder

log = logging.getLogger(__name__)

#: state_dict entries that count events (grow without bound): sent scaled down.
COUNTER_SUFFIXES = ("num_updates", "num_batches_tracked")
COUNTER_SCALE = 1.0 / 1024.0

OnRound = Callable[[int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ parameters (``flwr.server.workflow.SecAggPlusWorkflow``). Floats for
    ``num_shares``/``reconstruction_threshold`` are fractions of the sampled sites / shares.
    Any ``reconstruction_threshold`` sites colluding with the server can unmask one site's update;
    fewer than that many surviving sites stop the round."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.clipping_range > 0 or not self.max_weight > 0:
            raise ConfigError("secagg: clipping_range and max_weight must be > 0")
        if self.quantization_range >= self.modulus_range:
            raise ConfigError("secagg: quantization_range must be < modulus_range")


def update_scales(model_state: Mapping[str, torch.Tensor]) -> list[float]:
    """Per-array factor applied to the updates before quantisation (1, or ``COUNTER_SCALE`` for
    counters), in state_dict order."""
    return [COUNTER_SCALE if k.endswith(COUNTER_SUFFIXES) else 1.0 for k in model_state]


def _weighted_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """num-examples-weighted mean of every numeric metric (sums for counts)."""
    total = sum(n for n, _ in results)
    keys = set.intersection(*(set(m) for _, m in results)) if results else set()
    out: dict[str, Scalar] = {}
    for key in sorted(keys):
        vals = [(float(m[key]), n) for n, m in results if isinstance(m[key], (int, float))]
        if key in ("num-examples", "n_images", "n_lesion", "n_malignant", "steps"):
            out[key] = float(sum(v for v, _ in vals))
        elif key in ("epsilon", "epsilon_round", "seconds"):
            out[key] = float(max(v for v, _ in vals))
        elif total > 0:
            out[key] = float(sum(v * n for v, n in vals) / total)
    return out


class SecAggFedAvg(FedAvg):
    """Legacy FedAvg over updates: the secure weighted mean of the (scaled) site updates is
    unscaled and added to the global weights it was computed against."""

    def __init__(self, *, keys: list[str], scales: list[float], initial: list[np.ndarray],
                 fit_config: Callable[[int], dict[str, Scalar]], on_round: OnRound | None = None,
                 **kwargs: Any) -> None:
        super().__init__(initial_parameters=ndarrays_to_parameters(initial), on_fit_config_fn=fit_config,
                         fit_metrics_aggregation_fn=_weighted_metrics,
                         evaluate_metrics_aggregation_fn=_weighted_metrics, **kwargs)
        self.keys, self.scales = keys, np.asarray(scales, dtype=np.float64)
        self.on_round = on_round
        self.current: list[np.ndarray] = [np.array(a, copy=True) for a in initial]
        self.dtypes = [a.dtype for a in initial]

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        self.current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        if aggregated is None:
            return None, metrics
        mean_update = parameters_to_ndarrays(aggregated)
        new = [(c.astype(np.float64) + u.reshape(c.shape) / s).astype(dt)  # 0-d arrays travel as (1,)
               for c, u, s, dt in zip(self.current, mean_update, self.scales, self.dtypes)]
        if self.on_round is not None:
            self.on_round(server_round, dict(zip(self.keys, new)))
        return ndarrays_to_parameters(new), metrics


def run_secagg(grid: Grid, context: Context, spec: RunSpec, secagg: SecAggConfig,
               on_round: OnRound | None = None) -> ServerRunFolder:
    """Run ``spec`` with SecAgg+ on ``grid``; metrics and per-round checkpoints go to the run
    folder (aggregates only: the legacy strategy sees no site names). ``on_round(r, weights)``
    sees the initial weights (r = 0) and the global weights after each round."""
    fed, exp = spec.federation, spec.experiment
    if fed.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(f"federation.strategy {fed.strategy!r} cannot run under SecAgg+; "
                          f"use one of {SECAGG_STRATEGIES}")
    n_sites = len(spec.sites) if spec.sites else fed.min_sites
    folder = ServerRunFolder(spec.run_dir)
    folder.write_config(spec)
    state = build_experiment_model(exp).state_dict()
    keys, initial = list(state), [v.detach().cpu().numpy() for v in state.values()]
    scales = update_scales(state)
    base: dict[str, Scalar] = {
        "experiment": json.dumps(to_dict(exp)), "run-key": f"secagg-{int(time.time())}",
        "strategy": fed.strategy, "local-epochs": fed.local_epochs, "proximal-mu": fed.proximal_mu,
        "num-rounds": fed.rounds,
        KEY_SCALES: json.dumps(scales), KEY_RANGE: secagg.clipping_range,
        KEY_MAX_WEIGHT: secagg.max_weight,
    }
    central = CentralTest(spec) if fed.central_eval and spec.central_test else None
    rows: list[MetricRow] = []

    def record(rnd: int, phase: str, site: str, metric: str, value: float) -> None:
        rows.append(MetricRow(rnd, phase, site, metric, float(value)))

    def round_done(rnd: int, arrays: dict[str, np.ndarray]) -> None:
        weights = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        if central is not None:
            central.run(rnd, weights, record)
        folder.save(rnd, weights, spec, str(base["run-key"]), {})
        folder.write_status("running", rnd)
        if on_round is not None:
            on_round(rnd, arrays)

    strategy = SecAggFedAvg(
        keys=keys, scales=scales, initial=initial,
        fit_config=lambda rnd: {**base, "server-round": rnd}, on_round=round_done,
        on_evaluate_config_fn=lambda rnd: {**base, "server-round": rnd},
        fraction_fit=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
        min_fit_clients=n_sites, min_evaluate_clients=n_sites, min_available_clients=n_sites,
        accept_failures=True,
    )
    legacy = LegacyContext(context=context, strategy=strategy,
                           config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout_s))
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=secagg.num_shares, reconstruction_threshold=secagg.reconstruction_threshold,
        max_weight=secagg.max_weight, clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range, modulus_range=secagg.modulus_range,
        timeout=secagg.timeout_s,
    ))
    folder.write_status("running", 0)
    if on_round is not None:
        on_round(0, dict(zip(keys, initial)))
    workflow(grid, legacy)
    for phase, by_round in (("train", legacy.history.metrics_distributed_fit),
                            ("evaluate", legacy.history.metrics_distributed)):
        for key, series in by_round.items():
            for rnd, value in series:
                if isinstance(value, (int, float)):
                    record(int(rnd), phase, AGGREGATE_SITE, key, float(value))
    folder.append_metrics(sorted(rows, key=lambda r: (r.round, r.phase, r.site, r.metric)))
    folder.write_status("finished", fed.rounds, f"{fed.rounds} SecAgg+ rounds done")
    return folder


def make_secagg_server_app(spec: RunSpec | None = None, secagg: SecAggConfig | None = None,
                           on_round: OnRound | None = None) -> ServerApp:
    """ServerApp for SecAgg+ runs. Deployment: the spec from run_config like server/app.py, the
    SecAgg+ settings from run_config keys "secagg-<field>" (dashes), e.g. secagg-max-weight."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_spec, resume = resolve_server_spec(spec, False, context.run_config)
        if resume:
            raise ConfigError("SecAgg+ mode does not resume; start a new run")
        cfg = secagg or secagg_from_run_config(context.run_config)
        run_secagg(grid, context, run_spec, cfg, on_round)

    return app


def secagg_from_run_config(run_config: Mapping[str, Any]) -> SecAggConfig:
    values = {k[len("secagg-"):].replace("-", "_"): v for k, v in run_config.items()
              if str(k).startswith("secagg-")}
    return from_dict(SecAggConfig, values, "run_config secagg-*")


#: Deployment entry point of a SecAgg+ FAB (``serverapp = "server.secagg_app:app"``).
app = make_secagg_server_app()
