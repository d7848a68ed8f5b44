"""Federated units: the real Flower apps (client/app.py, server/app.py) on Flower's simulation
engine, one RunSpec per unit, and what the run leaves behind (checkpoint, curves, ε spent).

DP-SGD at the simulated sites: the unit's experiment carries the ``privacy`` section (enabled,
target ε over rounds × local epochs); the server sends the experiment with every message and
``client/app.py`` runs a ``PrivacySession`` per round from it. (Flower's simulation engine sets
each node's node_config to its partition id only, so a site's own ``privacy:`` terms, which a
deployed site passes as ``privacy-*`` node_config values, are not set per simulated node; the
session code is the same.) Each site's accountant lives under the unit's own run dir, so every
unit starts with a fresh budget.

Client-level DP and SecAgg+ come from the settings like in deployment
(``--set federation.client_dp.mode=server-fixed --set federation.packed_weights=false``, or
``--set federation.secagg.enabled=true``): the same ServerApp and ClientApp run them. A SecAgg+
unit's server sees no site, so its completeness check is the number of masked updates per round;
a SecAgg+ unit interrupted half-way starts over (the mode does not resume).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import pandas as pd
import torch

from common.checkpoint import load_checkpoint
from common.config import ExperimentConfig, replace
from common.federation import AGGREGATE_SITE, RunSpec, build_experiment_model
from common.fedmetrics import UNDEFINED
from common.modelfile import read_model
from common.privacy_state import load_state
from common.settings import Settings
from sim.protocols import PlannedUnit, Runtime

log = logging.getLogger(__name__)


#: Round deadline in simulation. Deployment's default (600 s) is for a site that vanished; here the
#: sites share this machine's cores, so a large site on a loaded machine can take longer than that,
#: and leaving it out would silently change the experiment (``missing_updates`` refuses such a run).
SIM_ROUND_TIMEOUT_S = 6 * 3600.0


def server_metrics(run_dir: Path) -> pd.DataFrame:
    """The server's metrics.csv (columns round, phase, site, metric, value); empty without one."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["round", "phase", "site", "metric", "value"])
    return pd.read_csv(path)


def missing_updates(run_dir: Path, sites: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, site) pairs of 1 … ``rounds`` without a train_loss row from that site in the
    server's metrics.csv: that site's update did not enter that round's aggregate."""
    m = server_metrics(run_dir)
    m = m[(m["phase"] == "train") & (m["metric"] == "train_loss")]
    seen = set(zip(m["round"].astype(int), m["site"].astype(str)))
    return [(rnd, s) for rnd in range(1, rounds + 1) for s in sites if (rnd, s) not in seen]


def federated_spec(pu: PlannedUnit, cfg: ExperimentConfig, settings: Settings, rt: Runtime) -> RunSpec:
    """The RunSpec of one federated unit: the settings' federation with the unit's strategy, the
    remaining centres as sites, no central test (the held-out centre is scored after the run,
    with the same code as every other arm)."""
    fed = dataclasses.replace(
        settings.federation,
        strategy=pu.unit.protocol,
        min_sites=len(pu.train_sites),
        central_eval=False,
        round_timeout_s=SIM_ROUND_TIMEOUT_S,
    )
    # Ray gives each simulated site one CPU (run_simulation_spec), so one torch thread each.
    exp = replace(cfg, **{"train.progress": False, "train.num_threads": 1})
    return RunSpec(experiment=exp, federation=fed, sites=tuple(rt.sites[c] for c in pu.train_sites),
                   run_dir=str(rt.scratch / pu.unit.key), cache_dir=rt.cache_dir)


class _Once(logging.Filter):
    """Pass each distinct message once per process: Flower repeats its deprecation warning of
    ``run_simulation`` at every call, once per unit."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.levelno < logging.WARNING or text not in self.seen:
            self.seen.add(text)
            return True
        return False


def _say_once(logger: logging.Logger) -> None:
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def run_simulation_spec(spec: RunSpec, num_cpus: float = 1.0) -> Path:
    """Run the real Flower apps of ``spec`` on Flower's simulation engine; returns the run dir.
    A previous attempt's server checkpoint is resumed, or reused as is when it finished."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    run_dir = Path(spec.run_dir)
    status = run_dir / "status.json"
    state = json.loads(status.read_text()) if status.is_file() else {}
    if state.get("state") == "finished" and state.get("round") == spec.federation.rounds:
        log.info("%s: federation already finished; reusing its checkpoint", run_dir)
        return run_dir
    resume = (run_dir / "checkpoint.pt").is_file()
    if resume and spec.federation.secagg.enabled:  # SecAgg+ does not resume: start the unit over
        log.warning("%s: SecAgg+ run interrupted after round %s; starting it over", run_dir, state.get("round"))
        for name in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "status.json"):
            (run_dir / name).unlink(missing_ok=True)
        resume = False
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO  # not -v: no per-round lines
    _say_once(logging.getLogger("flwr"))
    run_simulation(
        server_app=make_server_app(spec, resume=resume, quiet=quiet),
        client_app=make_client_app(spec),
        num_supernodes=len(spec.sites),
        backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0}},
    )
    return run_dir


def run_federated(pu: PlannedUnit, cfg: ExperimentConfig, settings: Settings, rt: Runtime,
                  ) -> tuple[torch.nn.Module, pd.DataFrame, dict[str, float]]:
    """(final global model, curves per round, ε each site spent: {} without DP)."""
    spec = federated_spec(pu, cfg, settings, rt)
    rounds = spec.federation.rounds
    run_dir = run_simulation_spec(spec)
    status = run_dir / "status.json"
    ck_path = run_dir / "checkpoint.pt"
    if not ck_path.is_file():
        raise RuntimeError(f"{run_dir}: the federation wrote no checkpoint (see {run_dir / 'server.log'})")
    ck = load_checkpoint(ck_path)
    done = int(ck["extra"]["round"])
    if done != rounds:
        raise RuntimeError(f"{run_dir}: federation stopped after round {done} of {rounds} "
                           f"({status.read_text().strip() if status.is_file() else 'no status'})")
    if spec.federation.secagg.enabled:  # the server saw only masked sums: count their members
        missing = masked_rounds_short(run_dir, len(spec.sites), rounds)
    else:
        missing = missing_updates(run_dir, [s.name for s in spec.sites], rounds)
    if missing:
        raise RuntimeError(f"{run_dir}: (round, site) updates missing from the aggregate: {missing[:10]} "
                           f"(see {run_dir / 'server.log'})")
    model = build_experiment_model(spec.experiment)
    # the run's product (model.pt, calibrated and carded): what fedbus-predict would score
    model.load_state_dict(read_model(run_dir / "model.pt")[0])
    spent = sites_epsilon(run_dir, [s.name for s in spec.sites]) if cfg.privacy.enabled else {}
    if spent:
        log.info("%s: DP-SGD ε spent per site: %s", pu.unit.key, ", ".join(f"{k} {v:.3f}" for k, v in spent.items()))
    if spec.federation.client_dp.enabled:  # a site-level guarantee: logged, not mixed with DP-SGD's ε
        log.info("%s: client-level DP (%s) ε %.3g at δ %g after %d rounds", pu.unit.key,
                 spec.federation.client_dp.mode, client_level_spent(run_dir), spec.federation.client_dp.delta, rounds)
    return model, federated_curves(run_dir), spent


def masked_rounds_short(run_dir: Path, num_sites: int, rounds: int) -> list[tuple[int, str]]:
    """SecAgg+: (round, "masked updates: k of n") for rounds 1 … ``rounds`` whose masked sum had
    fewer than ``num_sites`` members (the server's ``secagg_updates`` rows)."""
    m = server_metrics(run_dir)
    m = m[(m["phase"] == "train") & (m["metric"] == "secagg_updates")]
    got = dict(zip(m["round"].astype(int), m["value"].astype(float)))
    return [(rnd, f"masked updates: {got.get(rnd, 0):.0f} of {num_sites}") for rnd in range(1, rounds + 1)
            if got.get(rnd, 0) < num_sites]


def client_level_spent(run_dir: Path) -> float:
    """The last round's cumulative client-level ε (``client_dp_epsilon`` rows); NaN without one."""
    m = server_metrics(run_dir)
    m = m[(m["phase"] == "train") & (m["metric"] == "client_dp_epsilon")]
    return float(m.sort_values("round")["value"].iloc[-1]) if len(m) else math.nan


def sites_epsilon(run_dir: Path, sites: list[str]) -> dict[str, float]:
    """Each site's cumulative ε from its accountant file; a site without a file raises (DP was
    on, so it must have accounted its steps)."""
    from client.runtime import privacy_state_path

    spent: dict[str, float] = {}
    for name in sites:
        path = privacy_state_path(run_dir / "site-state" / name)
        state = load_state(path)
        if state is None:
            raise RuntimeError(f"{path}: DP was on but the site left no accountant state")
        spent[name] = float(state["epsilon"])
    return spent


def federated_curves(run_dir: Path) -> pd.DataFrame:
    """Per round: the sites' mean training loss and the validation Dice pooled over sites,
    from the server's metrics.csv."""
    m = server_metrics(run_dir)
    if m.empty:
        return pd.DataFrame(columns=["step", "step_kind", "loss", "val_dice"])
    m = m[m["site"] == AGGREGATE_SITE]
    loss = m[(m["phase"] == "train") & (m["metric"] == "train_loss")].set_index("round")["value"]
    dice = m[(m["phase"] == "evaluate") & (m["metric"] == "dice")].set_index("round")["value"]
    out = pd.concat({"loss": loss, "val_dice": dice}, axis=1).sort_index()
    out = out.where(out != UNDEFINED)  # sentinel of the fixed metric schema
    return out.rename_axis("step").reset_index().assign(step_kind="round")[["step", "step_kind", "loss", "val_dice"]]
