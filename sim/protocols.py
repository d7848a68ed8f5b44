"""The three leave-centre-out protocols as lists of units, and the code that runs one unit.

- paper: train on one centre, test on every other centre without fine-tuning (the published
  external validation), per arm (seg_only, multitask, consistency, feature ablations, λ sweep).
- federated: for each held-out centre, FedAvg / FedProx across the remaining centres with the
  real Flower apps on the simulation engine; the final global model is tested on the held-out
  centre.
- reference: local-only (each centre alone, tested on every centre; the diagonal is the
  centre's own held-out test split) and pooled centralised training on the federation's centres.

Every centre is a ``SiteSpec`` and every split comes from ``common.sitedata`` (the functions the
Flower clients use), so a centralised arm trains on exactly the images a federated site trains
on. Model selection is the same for every arm and protocol: the weights after the last epoch
(centralised) or the last round (federated); the validation split of each training centre is
held out of training and scored at the end (and every round by the federated sites).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from common.birads import birads_features
from common.checkpoint import load_checkpoint
from common.config import ALL_FEATURES, ConfigError, ExperimentConfig, replace
from common.data.splits import split_cases
from common.data.tensors import TensorData, to_tensors
from common.device import resolve_device, seed_everything
from common.evaluate import predict, score
from common.federation import (
    AGGREGATE_SITE,
    UNDEFINED,
    FederationConfig,
    RunSpec,
    SiteSpec,
    build_experiment_model,
)
from common.metrics import binary_auc, bootstrap_ci
from common.sitedata import load_site_tensors, load_test_tensors, site_cases
from common.train import train_local
from sim.runfolder import Unit

log = logging.getLogger(__name__)

PROTOCOL_GROUPS: dict[str, tuple[str, ...]] = {
    "paper": ("paper",),
    "federated": ("fedavg", "fedprox"),
    "reference": ("local", "pooled"),
}
BASE_ARMS: tuple[str, ...] = ("seg_only", "multitask", "consistency")
SELECTION_RULE = (
    "last epoch (centralised) / last round (federated) for every arm; each training centre's "
    "validation split (patient- and duplicate-aware) is never trained on and is scored at the end"
)


@dataclass(frozen=True)
class LcoOptions:
    """Protocol options (the ``lco:`` section of an experiment YAML). Epochs, image size and the
    loss come from the ExperimentConfig."""

    protocols: tuple[str, ...] = ("paper", "federated", "reference")
    arms: tuple[str, ...] = BASE_ARMS  # paper protocol
    fed_arms: tuple[str, ...] = ("consistency",)  # federated and reference protocols
    strategies: tuple[str, ...] = ("fedavg", "fedprox")
    train_centre: str | None = None  # None: BrEaST (real) / the first synthetic centre
    data_root: str | None = None  # None: embedded synthetic centres
    centres: tuple[str, ...] = ()  # subset of the centres found (empty: all)
    held_out: tuple[str, ...] = ()  # federated/pooled: centres to hold out (empty: each in turn)
    synthetic_n: int = 48  # cases per synthetic centre
    rounds: int = 3
    local_epochs: int = 1
    proximal_mu: float = 0.01
    seeds: tuple[int, ...] = (0,)
    lambda_sweep: tuple[float, ...] = ()
    ablate_features: bool = False
    reference_test_fraction: float = 0.25  # local-only diagonal: the centre's own test split
    bootstrap: int = 1000
    examples_per_centre: int = 2

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOL_GROUPS]
        if bad:
            raise ConfigError(f"lco.protocols: unknown {bad}; known: {list(PROTOCOL_GROUPS)}")
        bad = [s for s in self.strategies if s not in PROTOCOL_GROUPS["federated"]]
        if bad:
            raise ConfigError(f"lco.strategies: unknown {bad}; known: {list(PROTOCOL_GROUPS['federated'])}")
        for name in ("arms", "fed_arms"):
            for arm in getattr(self, name):
                if arm not in BASE_ARMS:
                    raise ConfigError(f"lco.{name}: unknown arm {arm!r}; known: {list(BASE_ARMS)}"
                                      " (ablations and λ sweep have their own options)")
        if self.rounds < 1 or self.local_epochs < 1 or self.synthetic_n < 4:
            raise ConfigError("lco: rounds and local_epochs must be >= 1, synthetic_n >= 4")
        if not self.seeds:
            raise ConfigError("lco.seeds: give at least one seed")
        if not 0.0 < self.reference_test_fraction < 1.0:
            raise ConfigError("lco.reference_test_fraction: must be in (0, 1)")


# ------------------------------------------------------------------------------- arms
def arm_config(cfg: ExperimentConfig, arm: str) -> ExperimentConfig:
    """The experiment of one arm: seg_only (no classification, no consistency), multitask
    (λ=0), consistency (λ from the config, 0.5 by default), consistency-no-<feature> (that
    feature left out of the prior), consistency-lambda<λ>."""
    if arm == "seg_only":
        return replace(cfg, **{"loss.cls_weight": 0.0, "loss.consistency": 0.0})
    if arm == "multitask":
        return replace(cfg, **{"loss.consistency": 0.0})
    if arm == "consistency":
        if cfg.loss.consistency <= 0 or cfg.loss.cls_weight <= 0:
            raise ConfigError("consistency arm needs loss.consistency > 0 and loss.cls_weight > 0")
        return cfg
    if arm.startswith("consistency-no-"):
        feature = arm.removeprefix("consistency-no-")
        kept = tuple(f for f in cfg.loss.features if f != feature)
        if feature not in cfg.loss.features or not kept:
            raise ConfigError(f"arm {arm}: {feature!r} is not one of several features {cfg.loss.features}")
        return replace(arm_config(cfg, "consistency"), **{"loss.features": kept})
    if arm.startswith("consistency-lambda"):
        lam = float(arm.removeprefix("consistency-lambda"))
        return replace(cfg, **{"loss.consistency": lam})
    raise ConfigError(f"unknown arm {arm!r}")


def paper_arms(opts: LcoOptions, cfg: ExperimentConfig) -> list[str]:
    arms = list(opts.arms)
    if opts.ablate_features:
        arms += [f"consistency-no-{f}" for f in cfg.loss.features]
    arms += [f"consistency-lambda{lam:g}" for lam in opts.lambda_sweep]
    return list(dict.fromkeys(arms))


# ------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlannedUnit:
    """One unit and what it trains on / is tested on. ``internal_test``: also test on the
    training centre's own held-out test split (local-only diagonal)."""

    unit: Unit
    train_sites: tuple[str, ...]
    test_sites: tuple[str, ...]
    internal_test: bool = False

    @property
    def federated(self) -> bool:
        return self.unit.protocol in PROTOCOL_GROUPS["federated"]


def plan_units(opts: LcoOptions, cfg: ExperimentConfig, centres: Sequence[str], train_centre: str) -> list[PlannedUnit]:
    """Every unit of the requested protocols, in the order they run (seeds innermost)."""
    centres = list(centres)
    plan: list[PlannedUnit] = []

    def add(protocol: str, arm: str, train: Sequence[str], test: Sequence[str], internal: bool = False) -> None:
        for seed in opts.seeds:
            unit = Unit(protocol, arm, "+".join(train), int(seed))
            plan.append(PlannedUnit(unit, tuple(train), tuple(test), internal))

    if "paper" in opts.protocols:
        if train_centre not in centres:
            raise ConfigError(f"train centre {train_centre!r} not among the centres {centres}")
        others = [c for c in centres if c != train_centre]
        for arm in paper_arms(opts, cfg):
            add("paper", arm, [train_centre], others)
    loco = len(centres) >= 3  # a federation needs >= 2 training sites besides the held-out one
    unknown = [c for c in opts.held_out if c not in centres]
    if unknown:
        raise ConfigError(f"lco.held_out: {unknown} not among the centres {centres}")
    held_outs = [c for c in centres if c in opts.held_out or not opts.held_out] if loco else []
    if "federated" in opts.protocols:
        if not loco:
            log.warning("federated protocol needs >= 3 centres, found %d: skipped", len(centres))
        for held_out in held_outs:
            rest = [c for c in centres if c != held_out]
            for strategy in opts.strategies:
                for arm in opts.fed_arms:
                    add(strategy, arm, rest, [held_out])
    if "reference" in opts.protocols:
        for centre in centres:
            for arm in opts.fed_arms:
                add("local", arm, [centre], centres, internal=True)
        for held_out in held_outs:
            rest = [c for c in centres if c != held_out]
            for arm in opts.fed_arms:
                add("pooled", arm, rest, [held_out])
    return plan


# ------------------------------------------------------------------------------- running
@dataclass
class UnitOutput:
    results: pd.DataFrame
    per_image: pd.DataFrame
    curves: pd.DataFrame
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Runtime:
    """Where units run: the sites by name, the tensor cache and scratch folders, the device."""

    sites: Mapping[str, SiteSpec]
    cache_dir: str | None
    scratch: Path
    device: str = "auto"
    progress: bool = True


def training_data(pu: PlannedUnit, cfg: ExperimentConfig, opts: LcoOptions, rt: Runtime,
                  ) -> tuple[TensorData, TensorData, TensorData | None]:
    """(train, val, internal test or None) of a centralised unit, pooled over its training
    centres. The local-only row splits off a test part (``reference_test_fraction``) with
    ``split_cases``, the same call ``load_site_tensors`` makes, so the three parts are disjoint."""
    if pu.internal_test:
        (centre,) = pu.train_sites
        site = rt.sites[centre]
        data_cfg = replace(cfg.data, test_fraction=opts.reference_test_fraction)
        train, val = load_site_tensors(site, data_cfg, rt.cache_dir)
        split = split_cases(site_cases(site, data_cfg), data_cfg.val_fraction, data_cfg.test_fraction,
                            seed=data_cfg.seed)
        return train, val, to_tensors(split.test, data_cfg.image_size)
    pairs = [load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir) for c in pu.train_sites]
    return TensorData.concat([p[0] for p in pairs]), TensorData.concat([p[1] for p in pairs]), None


def run_unit(pu: PlannedUnit, cfg: ExperimentConfig, opts: LcoOptions, rt: Runtime) -> UnitOutput:
    """Train one unit and evaluate it on its test centres."""
    t0 = time.perf_counter()
    cfg = replace(arm_config(cfg, pu.unit.arm), **{"train.seed": pu.unit.seed})
    device = resolve_device(rt.device)
    if pu.federated:
        model, curves = _federated(pu, cfg, opts, rt)
        internal = None
    else:
        train, val, internal = training_data(pu, cfg, opts, rt)
        model, curves = _centralised(pu, cfg, train, val, rt)
    rows: list[dict[str, Any]] = []
    images: list[pd.DataFrame] = []
    examples: list[dict[str, np.ndarray]] = []
    for centre in pu.test_sites:
        own = internal is not None and centre in pu.train_sites
        data = internal if own else load_test_tensors(rt.sites[centre], cfg.data, rt.cache_dir)
        probs, p_mal = predict(model, data, cfg.train.batch_size, device)
        result = score(probs, p_mal, data)
        rows += metric_rows(result.per_image, result.summary, centre, cfg.loss.cls_weight > 0,
                            opts.bootstrap, pu.unit.seed)
        images.append(result.per_image.assign(test_centre=centre))
        examples.append(pick_examples(model, data, probs, p_mal, result.per_image, opts.examples_per_centre, centre))
    results = pd.DataFrame(rows).assign(**pu.unit.columns())
    return UnitOutput(results, pd.concat(images, ignore_index=True), curves,
                      merge_examples(examples), time.perf_counter() - t0)


def _centralised(pu: PlannedUnit, cfg: ExperimentConfig, train: TensorData, val: TensorData, rt: Runtime,
                 ) -> tuple[torch.nn.Module, pd.DataFrame]:
    """Train from the seed's initialisation; curves: loss per epoch, and the validation Dice of
    the final (selected) model on the last epoch (``train_local`` has no per-epoch hook)."""
    seed_everything(cfg.train.seed)
    model = build_experiment_model(cfg)
    device = resolve_device(rt.device)
    result = train_local(model, train, replace(cfg.train, progress=rt.progress), cfg.loss,
                         device=device, augment=cfg.data.augment, desc=pu.unit.key)
    curves = pd.DataFrame([{"step": h["epoch"], "step_kind": "epoch", "loss": h["loss"], "val_dice": np.nan}
                           for h in result.history])
    if len(val) and not curves.empty:
        curves.loc[curves.index[-1], "val_dice"] = score(*predict(model, val, cfg.train.batch_size, device),
                                                         val).summary["dice"]
    return model, curves


# ------------------------------------------------------------------------------- federated
def federated_spec(pu: PlannedUnit, cfg: ExperimentConfig, opts: LcoOptions, rt: Runtime) -> RunSpec:
    """The RunSpec of one federated unit: the remaining centres as sites, no central test (the
    held-out centre is scored here, after the run, with the same code as every other arm)."""
    fed = FederationConfig(
        rounds=opts.rounds,
        local_epochs=opts.local_epochs,
        strategy=pu.unit.protocol,
        proximal_mu=opts.proximal_mu,
        min_sites=len(pu.train_sites),
        central_eval=False,
    )
    # Ray gives each simulated site one CPU (run_simulation_spec), so one torch thread each.
    exp = replace(cfg, **{"train.progress": False, "train.num_threads": 1})
    return RunSpec(experiment=exp, federation=fed, sites=tuple(rt.sites[c] for c in pu.train_sites),
                   run_dir=str(rt.scratch / pu.unit.key), cache_dir=rt.cache_dir)


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
    run_simulation(
        server_app=make_server_app(spec, resume=resume),
        client_app=make_client_app(spec),
        num_supernodes=len(spec.sites),
        backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0}},
    )
    return run_dir


def _federated(pu: PlannedUnit, cfg: ExperimentConfig, opts: LcoOptions, rt: Runtime) -> tuple[torch.nn.Module, pd.DataFrame]:
    spec = federated_spec(pu, cfg, opts, rt)
    run_dir = run_simulation_spec(spec)
    status = run_dir / "status.json"
    ck_path = run_dir / "checkpoint.pt"
    if not ck_path.is_file():
        raise RuntimeError(f"{run_dir}: the federation wrote no checkpoint (see {run_dir / 'server.log'})")
    ck = load_checkpoint(ck_path)
    done = int(ck["extra"]["round"])
    if done != opts.rounds:
        raise RuntimeError(f"{run_dir}: federation stopped after round {done} of {opts.rounds} "
                           f"({status.read_text().strip() if status.is_file() else 'no status'})")
    model = build_experiment_model(spec.experiment)
    model.load_state_dict(ck["state_dict"])
    return model, federated_curves(run_dir)


def federated_curves(run_dir: Path) -> pd.DataFrame:
    """Per round: the sites' mean training loss and the validation Dice pooled over sites,
    from the server's metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["step", "step_kind", "loss", "val_dice"])
    m = pd.read_csv(path)
    m = m[m["site"] == AGGREGATE_SITE]
    loss = m[(m["phase"] == "train") & (m["metric"] == "train_loss")].set_index("round")["value"]
    dice = m[(m["phase"] == "evaluate") & (m["metric"] == "dice")].set_index("round")["value"]
    out = pd.concat({"loss": loss, "val_dice": dice}, axis=1).sort_index()
    out = out.where(out != UNDEFINED)  # sentinel of the fixed metric schema
    return out.rename_axis("step").reset_index().assign(step_kind="round")[["step", "step_kind", "loss", "val_dice"]]


# ------------------------------------------------------------------------------- metrics
def metric_rows(per_image: pd.DataFrame, summary: Mapping[str, float], test_centre: str, classify: bool,
                n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Tidy rows (test_centre, metric, value, ci_low, ci_high, n) of one test centre.

    Dice/IoU/HD95 (px) over lesion images; HD95 in mm when every lesion image has a spacing;
    classification metrics over all images, left out for arms without a classification loss
    (their head is untrained). CIs: percentile bootstrap over images (``common.metrics``)."""
    rows: list[dict[str, Any]] = []

    def add(metric: str, value: float, values: np.ndarray) -> None:
        lo, hi = bootstrap_ci(values, n=n_boot, seed=seed) if len(values) else (float("nan"), float("nan"))
        rows.append({"test_centre": test_centre, "metric": metric, "value": float(value),
                     "ci_low": lo, "ci_high": hi, "n": len(values)})

    lesion = per_image[per_image["has_lesion"].astype(bool)]
    for metric, column in (("dice", "dice"), ("iou", "iou"), ("hd95", "hd95_px")):
        v = lesion[column].to_numpy(float)
        add(metric, summary[metric], v[np.isfinite(v)])
    mm = lesion["hd95_mm"].to_numpy(float)
    if len(mm) and np.isfinite(mm).all():
        add("hd95_mm", float(mm.mean()), mm)
    if not classify:
        return rows
    y = per_image["malignant"].to_numpy(float)
    p = per_image["p_malignant"].to_numpy(float)
    lo, hi = auc_ci(y, p, n_boot, seed)
    rows.append({"test_centre": test_centre, "metric": "auc", "value": float(summary["auc"]),
                 "ci_low": lo, "ci_high": hi, "n": len(y)})
    decided = p >= 0.5
    add("sensitivity", summary["sensitivity"], (decided[y > 0.5]).astype(float))
    add("specificity", summary["specificity"], (~decided[y <= 0.5]).astype(float))
    add("accuracy", summary["accuracy"], (decided == (y > 0.5)).astype(float))
    return rows


def auc_ci(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling malignant and other images separately
    (``bootstrap_ci`` resamples images jointly, and a small test set then draws resamples with
    one class only, whose AUC is undefined)."""
    pos, neg = np.flatnonzero(y > 0.5), np.flatnonzero(y <= 0.5)
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = [binary_auc(np.r_[np.ones(pos.size), np.zeros(neg.size)],
                       np.r_[p[rng.choice(pos, pos.size)], p[rng.choice(neg, neg.size)]])
            for _ in range(n_boot)]
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------- examples
def pick_examples(model: torch.nn.Module, data: TensorData, probs: np.ndarray, p_mal: np.ndarray,
                  per_image: pd.DataFrame, k: int, centre: str) -> dict[str, np.ndarray]:
    """Up to ``k`` lesion images of one test centre (malignant first, then benign) with the
    prediction, p̂, φ and the BI-RADS feature values of the predicted soft mask."""
    lesion = np.flatnonzero(per_image["has_lesion"].to_numpy(bool))
    mal = [i for i in lesion if per_image["malignant"].iat[i] == 1]
    ben = [i for i in lesion if per_image["malignant"].iat[i] == 0]
    order = [x for pair in zip(mal, ben) for x in pair] + mal[len(ben):] + ben[len(mal):]
    idx = np.array(order[:k], dtype=int)
    if idx.size == 0:
        return {}
    prob_t = torch.from_numpy(probs[idx]).float()
    image_t = data.images[torch.from_numpy(idx)].float().cpu()
    with torch.no_grad():
        feats = birads_features(prob_t, image_t, None, ALL_FEATURES)
        prior = model.prior.cpu().eval()
        cols = [ALL_FEATURES.index(n) for n in prior.names]
        phi = prior(feats[:, cols]).numpy()
    return {
        "images": image_t[:, 0].numpy(),
        "masks": data.masks[torch.from_numpy(idx)][:, 0].cpu().numpy(),
        "probs": probs[idx, 0],
        "p_hat": p_mal[idx],
        "phi": phi,
        "malignant": per_image["malignant"].to_numpy(float)[idx],
        "dice": per_image["dice"].to_numpy(float)[idx],
        "centres": np.array([centre] * idx.size),
        "case_ids": per_image["case_id"].to_numpy(str)[idx],
        "features": feats.numpy(),
        "feature_names": np.array(ALL_FEATURES),
        "prior_names": np.array(prior.names),
    }


def merge_examples(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p]
    if not parts:
        return {}
    fixed = ("feature_names", "prior_names")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in fixed}
    out.update({k: parts[0][k] for k in fixed})
    return out
