"""Flower ServerApp: the federation's round loop, with quorum, per-site metrics and resume.

Our own loop over ``grid.send_and_receive`` instead of ``Strategy.start`` because a hospital
federation needs what ``start`` lacks: a query round that names the sites, a bounded wait for
a quorum of sites (stock sampling waits forever), a checkpoint after each round and resume
from it. Aggregation itself is Flower's (server/strategies.py).

Deployment: ``app`` reads the run from ``context.run_config``: "run-spec" (path of a RunSpec
YAML written by flower-server from the experiment file) and "resume" (bool); configuration has
no other way in (common/settings.py).
Simulation: ``make_server_app(spec)`` bakes the spec in (run_simulation ignores run_config).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, to_dict
from common.demo import DEMO_PRESET, demo_spec
from common.device import resolve_device, seed_everything
from common.federation import (
    AGGREGATE_SITE,
    RunSpec,
    buffer_keys,
    build_experiment_model,
    load_run_spec,
    norm_keys,
)
from common.fedmetrics import aggregate_site_metrics, eval_metrics
from common.inference import evaluate
from common.sitedata import load_test_tensors
from server.calibration import calibrate_model
from server.dp import planned_sampled_sites, wrap_client_dp
from server.identity import IdentityCheck
from server.outcome import FederationFailed, FederationStopped  # noqa: F401  (re-exported)
from server.prior_rows import PriorLog
from server.registry import Clock, SiteRegistry, Sleep, gather_sites
from server.run_end import run_end_announced
from server.runlog import attach_run_log
from server.screening import aggregate_problem, audit_screening
from server.state import MetricRow, ServerRunFolder, check_resumable
from server.strategies import build_strategy

log = logging.getLogger(__name__)


def make_server_app(spec: RunSpec | None = None, *, resume: bool = False, quiet: bool = False) -> ServerApp:
    """ServerApp running ``spec`` (simulation) or the spec named by run_config (deployment).
    ``quiet``: Flower's own per-round INFO lines are not printed (our server.log keeps ours)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # deployment (flower-server): the sites' launchers learn that the run is over
        with run_end_announced(grid, enabled=spec is None and bool(context.run_config.get("run-spec"))):
            run_main(grid, context)

    def run_main(grid: Grid, context: Context) -> None:
        if quiet:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        identity = None
        if spec is None and not context.run_config.get("run-spec"):
            run_spec, do_resume = _demo_spec(grid, context.run_id), False  # `flwr run .`
        else:
            run_spec, do_resume = resolve_server_spec(spec, resume, context.run_config)
            if spec is None:  # deployment: flower-server writes the key registry into the run folder
                identity = IdentityCheck.from_run_dir(run_spec.run_dir)
        if run_spec.federation.secagg.enabled:  # federation.secagg: the legacy SecAgg+ workflow
            from server.secagg_app import run_secagg_spec

            central = CentralTest(run_spec) if run_spec.federation.central_eval and run_spec.central_test else None
            run_secagg_spec(grid, context, run_spec, resume=do_resume, central=central)
            return
        run_federation(grid, run_spec, resume=do_resume, identity=identity)

    return app


def _demo_spec(grid: Grid, run_id: int, wait_s: float = 60.0) -> RunSpec:
    """`flwr run .` (no run spec): the smoke preset on one synthetic site per SuperNode."""
    deadline = time.monotonic() + wait_s
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    spec = demo_spec(max(len(nodes), 1), f"flwr-run-{run_id}")
    log.info("no run spec (flwr run .): the %s demo on %d synthetic site(s); run folder %s "
             "(real federations start with flower-server)", DEMO_PRESET, len(spec.sites), spec.run_dir)
    return spec


def resolve_server_spec(spec: RunSpec | None, resume: bool, run_config: Mapping[str, Any]) -> tuple[RunSpec, bool]:
    """The spec to run and whether to resume (explicit arguments win over run_config)."""
    resume = resume or str(run_config.get("resume", "false")).lower() in ("true", "1", "yes")
    if spec is not None:
        return spec, resume
    if not run_config.get("run-spec"):
        raise ConfigError("run_config has no run-spec: start federations with flower-server "
                          "(it writes the run spec from the experiment file and passes its path)")
    return load_run_spec(str(run_config["run-spec"])), resume


def run_federation(
    grid: Grid,
    spec: RunSpec,
    *,
    resume: bool = False,
    poll_s: float = 1.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    identity: IdentityCheck | None = None,
) -> ServerRunFolder:
    """Run (or resume) the federation described by ``spec`` on ``grid``; returns its folder.
    Raises FederationStopped when fewer than ``min_sites`` sites are connected after
    ``quorum_timeout_s`` at the start of a round, FederationFailed when a round yields no finite
    model (server/screening.py). ``identity``: refuse nodes whose claimed site name is not the
    name their key was registered under (server/identity.py); None: not checked."""
    fed, exp = spec.federation, spec.experiment
    folder = ServerRunFolder(spec.run_dir)
    start, state, run_key, strategy_state = _initial_state(folder, spec, resume)
    folder.write_config(spec)
    detach_log = attach_run_log(folder.path)
    try:
        rows: list[MetricRow] = []

        def record(rnd: int, phase: str, site: str, metric: str, value: float) -> None:
            rows.append(MetricRow(rnd, phase, site, metric, float(value)))

        registry = SiteRegistry(s.name for s in spec.sites)
        model = build_experiment_model(exp)
        strategy = build_strategy(fed, registry=registry, recorder=record, seed=exp.train.seed,
                                  norm_keys=norm_keys(model), buffer_keys=buffer_keys(model),
                                  batch_size=exp.train.batch_size)
        strategy = wrap_client_dp(strategy, fed.client_dp, planned_sampled_sites(fed, len(spec.sites)),
                                  num_sites=len(spec.sites))  # federation.client_dp (unchanged when off)
        strategy.load_state_dict(strategy_state)  # type: ignore[attr-defined]
        arrays = ArrayRecord(state)
        base = {"experiment": json.dumps(to_dict(exp)), "run-key": run_key, "strategy": fed.strategy,
                "num-rounds": fed.rounds}
        central = CentralTest(spec) if fed.central_eval and spec.central_test else None
        prior_log = PriorLog(exp)  # the learned BI-RADS prior per round, for the report
        saved = start
        folder.write_status("running", saved)
        for rnd in range(start + 1, fed.rounds + 1):
            registry.clear_failed()
            sites = gather_sites(grid, registry, fed, base, clock=clock, sleep=sleep, poll_s=poll_s,
                                 identity=identity)
            for refusal in identity.drain() if identity is not None else ():
                record(rnd, "join", refusal.registered or f"node-{refusal.node_id}", "identity_refused", 1.0)
            if len(sites) < fed.min_sites:
                text = (f"round {rnd}: {len(sites)} site(s) {list(sites)} connected after "
                        f"{fed.quorum_timeout_s:.0f}s, {fed.min_sites} needed; stopping. The checkpoint "
                        f"of round {saved} is kept; resume to continue.")
                log.error(text)
                folder.append_metrics(rows)
                folder.write_status("stopped", saved, text)
                raise FederationStopped(text)
            log.info("round %d/%d: %s with sites %s", rnd, fed.rounds, fed.strategy, list(sites))
            t0 = clock()
            train_cfg = ConfigRecord({**base, "local-epochs": fed.local_epochs})
            replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, train_cfg, grid),
                                            timeout=fed.round_timeout_s)
            dropped_before = set(registry.dropped)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            audit_screening(identity.audit_log if identity is not None else None, rnd,  # deployment only
                            getattr(strategy, "last_rejections", {}), registry.dropped - dropped_before,
                            fed.drop_after_rejections, spec.run_dir)
            problem = aggregate_problem(new_arrays, strategy.last_failures["train"])  # type: ignore[attr-defined]
            if problem:  # never go on (or finish) with a poisoned or unchanged model
                text = (f"round {rnd}: {problem}; stopping. The checkpoint of round {saved} is kept; "
                        "fix or remove the offending site(s) before resuming.")
                log.error(text)
                folder.append_metrics(rows)
                folder.write_status("failed", saved, text)
                raise FederationFailed(text)
            arrays = new_arrays
            prior_log.record_round(rnd, arrays, replies, strategy, record)
            record(rnd, "train", AGGREGATE_SITE, "wall_seconds", clock() - t0)
            t0 = clock()
            replies = grid.send_and_receive(
                strategy.configure_evaluate(rnd, arrays, ConfigRecord(base), grid), timeout=fed.round_timeout_s)
            strategy.aggregate_evaluate(rnd, replies)
            record(rnd, "evaluate", AGGREGATE_SITE, "wall_seconds", clock() - t0)
            if central is not None:
                central.run(rnd, arrays.to_torch_state_dict(), record)
            _log_round(rnd, rows)
            folder.append_metrics(rows)
            rows.clear()
            if rnd % fed.checkpoint_every == 0 or rnd == fed.rounds:
                folder.save(rnd, arrays.to_torch_state_dict(), spec, run_key, strategy.state_dict())  # type: ignore[attr-defined]
                saved = rnd
            folder.write_status("running", saved)
        final = arrays.to_torch_state_dict()
        model_path = folder.write_model(fed.rounds, final, spec, run_key)  # what fedbus-predict takes
        calibrate_model(grid, registry, base, final, model_path, exp, fed.round_timeout_s)  # sites' sums only
        folder.write_status("finished", saved, f"{fed.rounds} rounds done")
        log.info("federation finished: %d rounds, run folder %s", fed.rounds, folder.path)
        return folder
    finally:
        detach_log()


def _initial_state(folder: ServerRunFolder, spec: RunSpec, resume: bool) -> tuple[int, dict[str, torch.Tensor], str, dict[str, Any]]:
    """(last finished round, global weights, run key, strategy state): from the checkpoint when
    resuming, else freshly initialised with the experiment seed."""
    if folder.has_checkpoint():
        if not resume:
            raise FileExistsError(
                f"{folder.checkpoint_path}: the run folder already holds a checkpoint; resume it or choose a new run_dir")
        saved = folder.load(restore=True)
        check_resumable(spec, saved.spec, str(folder.checkpoint_path))
        dropped = folder.truncate_metrics(saved.round)
        log.info("resuming %s after round %d (%d metric rows of unfinished rounds dropped)",
                 folder.path, saved.round, dropped)
        return saved.round, saved.state_dict, saved.run_key, saved.strategy_state
    if resume:
        log.warning("%s: no checkpoint to resume; starting a new run", folder.path)
    seed_everything(spec.experiment.train.seed)
    model = build_experiment_model(spec.experiment)
    run_key = uuid.uuid4().hex[:12]  # scopes site-local state (FedBN norms) to this run
    return 0, model.state_dict(), run_key, {}


class CentralTest:
    """Server-side evaluation of the global model on held-out centres (``spec.central_test``),
    all of their cases. Under FedBN the global norm layers are the initial ones."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self._data: dict[str, Any] = {}

    def run(self, rnd: int, state_dict: Mapping[str, torch.Tensor],
            record: Callable[[int, str, str, str, float], None]) -> dict[str, dict[str, float]]:
        exp = self.spec.experiment
        device = resolve_device(exp.train.device)
        model = build_experiment_model(exp)
        model.load_state_dict(dict(state_dict))
        per_site: dict[str, dict[str, float]] = {}
        for site in self.spec.central_test:
            if site.name not in self._data:
                self._data[site.name] = load_test_tensors(site, exp.data, self.spec.cache_dir)
            data = self._data[site.name]
            t0 = time.perf_counter()
            result = evaluate(model, data, exp.inference, batch_size=exp.train.batch_size, device=device)
            n_malignant = int(data.malignant.sum().item()) if len(data) else 0
            per_site[site.name] = eval_metrics(result.summary, n_malignant, time.perf_counter() - t0)
            for key, value in per_site[site.name].items():
                record(rnd, "central", site.name, key, value)
        for key, value in aggregate_site_metrics(per_site, "evaluate").items():
            record(rnd, "central", AGGREGATE_SITE, key, value)
        return per_site


def _log_round(rnd: int, rows: list[MetricRow]) -> None:
    """One line per phase and site, e.g. 'round 2 evaluate BUSI: dice 0.61 auc 0.80'."""
    keys = {"train": ("train_loss", "seconds"), "evaluate": ("dice", "auc", "seconds"),
            "central": ("dice", "auc")}
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r.phase, r.site), {})[r.metric] = r.value
    for (phase, site), values in table.items():
        shown = " ".join(f"{k} {values[k]:.4g}" for k in keys.get(phase, ()) if k in values)
        if "failed" in values:
            shown = "FAILED"
        if "rejected" in values:
            shown = "REJECTED (reason logged above)"
        if shown:
            log.info("round %d %s %s: %s", rnd, phase, site, shown)


#: Deployment entry point (pyproject ``[tool.flwr.app.components] serverapp``).
app = make_server_app()
