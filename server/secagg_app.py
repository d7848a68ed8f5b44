"""SecAgg+ mode, server side: legacy FedAvg inside ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)``.

Secure aggregation (Bell et al. 2020, SecAgg+) lets the server learn only the weighted **sum**
of the site updates, never one site's update: sites add pairwise masks that cancel in the sum,
and secret-share their mask seeds so the sum can still be unmasked when some sites drop out.
Flower 1.41 has it only for the legacy Strategy API (flower-1.41 notes §1.7), so this is a
separate round loop next to server/app.py's, selected by ``federation.secagg.enabled`` in the
experiment file: server/app.py's ServerApp hands such runs to ``run_secagg_spec`` (deployment and
simulation alike; the sites' ClientApp routes the legacy messages to client/secagg_app.py). No
site-name query, quorum wait, per-site screening or resume; no FedBN / FedAdam / FedMedian (a
masked sum supports the mean only; FedProx works, the sites add the term). Compatibility with
DP: sample-level DP-SGD at the sites — yes; client-level DP — no (common/config.py refuses it).
Each round's number of masked updates is recorded (``secagg_updates``) and the run's log lines
(Flower's "Secure aggregation commencing/completed" included) go to ``<run_dir>/server.log``.

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
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import ConfigError, SecAggConfig, to_dict
from common.federation import AGGREGATE_SITE, RunSpec, build_experiment_model
from launch.wire import KEY_MAX_WEIGHT, KEY_RANGE, KEY_SCALES, SECAGG_STRATEGIES
from server.runlog import attach_run_log
from server.state import MetricRow, ServerRunFolder

log = logging.getLogger(__name__)

#: state_dict entries that count events (grow without bound): sent scaled down.
COUNTER_SUFFIXES = ("num_updates", "num_batches_tracked")
COUNTER_SCALE = 1.0 / 1024.0

OnRound = Callable[[int, dict[str, np.ndarray]], None]
Record = Callable[[int, str, str, str, float], None]
__all__ = ["SecAggConfig", "SecAggFedAvg", "make_secagg_server_app", "run_secagg", "run_secagg_spec"]


class CentralEval(Protocol):
    """Server-side scoring of held-out centres (server/app.py ``CentralTest``)."""

    def run(self, rnd: int, state_dict: Mapping[str, torch.Tensor], record: Record) -> Any: ...


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
        self.last_count = 0  # masked updates in the last round's sum

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        self.current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.last_count = len(results)
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        if aggregated is None:
            return None, metrics
        mean_update = parameters_to_ndarrays(aggregated)
        new = [(c.astype(np.float64) + u.reshape(c.shape) / s).astype(dt)  # 0-d arrays travel as (1,)
               for c, u, s, dt in zip(self.current, mean_update, self.scales, self.dtypes)]
        if self.on_round is not None:
            self.on_round(server_round, dict(zip(self.keys, new)))
        return ndarrays_to_parameters(new), metrics


def run_secagg_spec(grid: Grid, context: Context, spec: RunSpec, *, resume: bool = False,
                    central: CentralEval | None = None) -> ServerRunFolder:
    """The ServerApp's entry for ``federation.secagg.enabled`` runs (server/app.py): a new run
    only (a masked round cannot be resumed half-way, and this loop keeps no strategy state)."""
    if resume:
        raise ConfigError("federation.secagg: SecAgg+ runs do not resume; start a new run (new run_dir)")
    folder = ServerRunFolder(spec.run_dir)
    if folder.has_checkpoint():
        raise FileExistsError(f"{folder.checkpoint_path}: the run folder already holds a checkpoint; "
                              "SecAgg+ runs do not resume: choose a new run_dir")
    return run_secagg(grid, context, spec, spec.federation.secagg, central=central)


def run_secagg(grid: Grid, context: Context, spec: RunSpec, secagg: SecAggConfig,
               on_round: OnRound | None = None, central: CentralEval | None = None) -> ServerRunFolder:
    """Run ``spec`` with SecAgg+ on ``grid``; metrics and per-round checkpoints go to the run
    folder (aggregates only: the legacy strategy sees no site names). ``on_round(r, weights)``
    sees the initial weights (r = 0) and the global weights after each round; ``central``
    scores held-out centres after each round."""
    fed, exp = spec.federation, spec.experiment
    if fed.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(f"federation.strategy {fed.strategy!r} cannot run under SecAgg+; "
                          f"use one of {SECAGG_STRATEGIES}")
    n_sites = len(spec.sites) if spec.sites else fed.min_sites
    if n_sites < 3:
        log.warning("SecAgg+ with %d sites: each site can derive the other's update from the mean and its "
                    "own; the masking protects updates from the server only with 3 or more sites", n_sites)
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
    rows: list[MetricRow] = []

    def record(rnd: int, phase: str, site: str, metric: str, value: float) -> None:
        rows.append(MetricRow(rnd, phase, site, metric, float(value)))

    def round_done(rnd: int, arrays: dict[str, np.ndarray]) -> None:
        weights = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        if central is not None:
            central.run(rnd, weights, record)
        record(rnd, "train", AGGREGATE_SITE, "secagg_updates", float(strategy.last_count))
        log.info("round %d/%d: SecAgg+ aggregated the masked updates of %d site(s)", rnd, fed.rounds,
                 strategy.last_count)
        folder.save(rnd, weights, spec, str(base["run-key"]), {})
        folder.write_status("running", rnd)
        last[:] = [rnd, weights]
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
    last: list[Any] = []
    folder.write_status("running", 0)
    if on_round is not None:
        on_round(0, dict(zip(keys, initial)))
    detach_log = attach_run_log(folder.path, ("server", "flwr"))
    try:
        log.info("SecAgg+ run: %d rounds, %d sites, strategy %s, clipping range %g, %d quantisation levels",
                 fed.rounds, n_sites, fed.strategy, secagg.clipping_range, secagg.quantization_range)
        workflow(grid, legacy)
    finally:
        detach_log()
    for phase, by_round in (("train", legacy.history.metrics_distributed_fit),
                            ("evaluate", legacy.history.metrics_distributed)):
        for key, series in by_round.items():
            for rnd, value in series:
                if isinstance(value, (int, float)):
                    record(int(rnd), phase, AGGREGATE_SITE, key, float(value))
    folder.append_metrics(sorted(rows, key=lambda r: (r.round, r.phase, r.site, r.metric)))
    if not last or last[0] != fed.rounds:
        text = f"SecAgg+ ended after round {last[0] if last else 0} of {fed.rounds} (see server.log)"
        folder.write_status("failed", last[0] if last else 0, text)
        raise RuntimeError(text)
    folder.write_model(fed.rounds, last[1], spec, str(base["run-key"]))  # what fedbus-predict takes
    folder.write_status("finished", fed.rounds, f"{fed.rounds} SecAgg+ rounds done")
    return folder


def make_secagg_server_app(spec: RunSpec, secagg: SecAggConfig | None = None,
                           on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp running ``spec`` under SecAgg+ with ``secagg`` (default: the spec's own
    ``federation.secagg``), for simulations and tests that watch each round (``on_round``).
    Deployment needs no app of its own: server/app.py's ServerApp runs ``federation.secagg``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_secagg(grid, context, spec, secagg or spec.federation.secagg, on_round)

    return app
