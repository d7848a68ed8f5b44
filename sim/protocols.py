"""The three leave-centre-out protocols as lists of units: options, arms, the unit plan, and the
tidy metric rows every unit reports (the code that runs a unit is in sim/units.py).

- paper: train on one centre, test on every other centre without fine-tuning (the published
  external validation), per arm (seg_only, multitask, consistency, feature ablations, λ sweep).
- federated: for each held-out centre, FedAvg / FedProx across the remaining centres with the
  real Flower apps on the simulation engine; the final global model is tested on the held-out
  centre.
- reference: local-only (each centre alone, tested on every centre; the diagonal is the
  centre's own held-out test split) and pooled centralised training on the federation's centres
  (``pooled``: those rows alone).

DP arms (``epsilons``): every arm of ``dp_arms`` that a protocol runs gets one extra arm
``{arm}-eps{ε}`` per finite ε, trained with sample-level DP-SGD (``common.privacy``) at that
target over the unit's whole training (epochs, or rounds × local epochs); ε = inf is the arm
itself, without DP.

Every centre is a ``SiteSpec`` and every split comes from ``common.sitedata`` (the functions the
Flower clients use), so a centralised arm trains on exactly the images a federated site trains
on. Model selection (``selection``): centralised arms keep the epoch with the best validation
score (mean of validation Dice and AUC, Dice alone for seg_only) or the last epoch; federated
arms keep the last round.

Public → private (``public_centres``): every paper-protocol arm starts from a model trained
without DP on the public centres (sim/public.py, ``model.init_from``); those centres are then
left out of the paper protocol's test centres.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from common.config import ConfigError, ExperimentConfig, replace
from common.federation import SiteSpec
from common.metrics import binary_auc, bootstrap_ci
from common.settings import CONSISTENCY_GRAD_ARMS, PROTOCOL_GROUPS, Settings, SimConfig
from sim.runfolder import Unit

log = logging.getLogger(__name__)

DP_SUFFIX = "-eps"
#: Arm suffix of the paper protocol's ensembles: the mean of an arm's seeds (sim/ensemble.py).
ENSEMBLE_SUFFIX = "-ens"


def selection_rule(selection: str) -> str:
    """The model-selection sentence of the report."""
    central = ("the epoch with the best validation score (mean of validation Dice and AUC; Dice "
               "alone for seg_only or a one-class validation split), ties to the later epoch"
               if selection == "best_val" else "the last epoch")
    return (f"centralised arms: {central}; federated arms: the last round. Each training centre's "
            "validation split (patient- and duplicate-aware) is never trained on")


# ------------------------------------------------------------------------------- arms
def dp_arm(arm: str, epsilon: float) -> str:
    """Name of ``arm`` trained with DP-SGD at target ε (ε = inf: the arm itself)."""
    return arm if math.isinf(epsilon) else f"{arm}{DP_SUFFIX}{epsilon:g}"


def split_dp_arm(arm: str) -> tuple[str, float]:
    """(base arm, target ε) of an arm name; ε = inf for an arm without DP."""
    base, sep, eps = arm.rpartition(DP_SUFFIX)
    if not sep:
        return arm, math.inf
    try:
        return base, float(eps)
    except ValueError:
        raise ConfigError(f"arm {arm!r}: {eps!r} after {DP_SUFFIX!r} is not a number") from None


def with_dp_arms(arms: Sequence[str], opts: SimConfig) -> list[str]:
    """``arms`` with, after each arm of ``opts.dp_arms``, its DP variants (finite ε only)."""
    out: list[str] = []
    for arm in arms:
        out.append(arm)
        if arm in opts.dp_arms:
            out += [dp_arm(arm, e) for e in sorted(opts.epsilons) if not math.isinf(e)]
    return list(dict.fromkeys(out))


def arm_config(cfg: ExperimentConfig, arm: str, planned_epochs: int | None = None) -> ExperimentConfig:
    """The experiment of one arm: seg_only (no classification, no consistency), multitask
    (λ=0), consistency (λ from the config, 0.5 by default), consistency-mask / -classifier /
    -both (that arm with ``loss.consistency_grad`` set so), consistency-no-<feature> (that
    feature left out of the prior), consistency-lambda<λ>; ``<arm>-eps<ε>``: that arm with
    DP-SGD (``cfg.privacy`` with enabled, target ε, and ``planned_epochs``: every local epoch
    the unit will train, so that σ is planned for the whole unit)."""
    base, epsilon = split_dp_arm(arm)
    if not math.isinf(epsilon):
        if planned_epochs is None or planned_epochs < 1:
            raise ConfigError(f"arm {arm}: DP needs the planned epochs of the unit")
        privacy = dataclasses.replace(cfg.privacy, enabled=True, target_epsilon=epsilon,
                                      noise_multiplier=None, planned_epochs=int(planned_epochs))
        return dataclasses.replace(arm_config(cfg, base), privacy=privacy)
    if arm == "seg_only":
        return replace(cfg, **{"loss.cls_weight": 0.0, "loss.consistency": 0.0})
    if arm == "multitask":
        return replace(cfg, **{"loss.consistency": 0.0})
    if arm == "consistency":
        if cfg.loss.consistency <= 0 or cfg.loss.cls_weight <= 0:
            raise ConfigError("consistency arm needs loss.consistency > 0 and loss.cls_weight > 0")
        return cfg
    if arm in CONSISTENCY_GRAD_ARMS:  # the consistency arm with its gradient routed as named
        mode = arm.removeprefix("consistency-")
        return replace(arm_config(cfg, "consistency"), **{"loss.consistency_grad": mode})
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


def paper_arms(opts: SimConfig, cfg: ExperimentConfig) -> list[str]:
    arms = list(opts.arms)
    if opts.ablate_features:
        arms += [f"consistency-no-{f}" for f in cfg.loss.features]
    arms += [f"consistency-lambda{lam:g}" for lam in opts.lambda_sweep]
    return with_dp_arms(list(dict.fromkeys(arms)), opts)


# ------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlannedUnit:
    """One unit and what it trains on / is tested on. ``internal_test``: its training centres
    hold back their own test splits and are tested on them (local-only diagonal, own_split)."""

    unit: Unit
    train_sites: tuple[str, ...]
    test_sites: tuple[str, ...]
    internal_test: bool = False

    @property
    def federated(self) -> bool:
        return self.unit.protocol in PROTOCOL_GROUPS["federated"]

    def planned_epochs(self, settings: Settings) -> int:
        """Every local epoch this unit trains (what a DP arm plans its noise for)."""
        fed = settings.federation
        return fed.rounds * fed.local_epochs if self.federated else settings.experiment.train.epochs


def plan_units(settings: Settings, centres: Sequence[str], train_centre: str) -> list[PlannedUnit]:
    """Every unit of the requested protocols, in the order they run (seeds innermost)."""
    opts, cfg = settings.sim, settings.experiment
    centres = list(centres)
    plan: list[PlannedUnit] = []

    def add(protocol: str, arm: str, train: Sequence[str], test: Sequence[str], internal: bool = False) -> None:
        for seed in opts.seeds:
            unit = Unit(protocol, arm, "+".join(train), int(seed))
            plan.append(PlannedUnit(unit, tuple(train), tuple(test), internal))

    public = check_public_centres(settings, centres, train_centre)
    if "paper" in opts.protocols:
        if train_centre not in centres:
            raise ConfigError(f"train centre {train_centre!r} not among the centres {centres}")
        others = [c for c in centres if c != train_centre and c not in public]  # trained on: not external
        if not others:
            raise ConfigError(f"sim.public_centres {list(public)}: no centre is left to test the paper "
                              f"protocol on (centres {centres}, training centre {train_centre!r})")
        for arm in paper_arms(opts, cfg):
            add("paper", arm, [train_centre], others)
    layouts = federation_layouts(opts, centres)  # (training centres, test centres, own split)
    if "federated" in opts.protocols:
        if not layouts:
            log.warning("federated protocol needs >= 3 centres (2 with sim.test_on own_split), found %d: "
                        "skipped", len(centres))
        for train, test, own in layouts:
            for strategy in opts.strategies:
                for arm in with_dp_arms(opts.fed_arms, opts):
                    add(strategy, arm, train, test, internal=own)
    if "reference" in opts.protocols:
        for centre in centres:
            for arm in with_dp_arms(opts.fed_arms, opts):
                add("local", arm, [centre], centres, internal=True)
    if "reference" in opts.protocols or "pooled" in opts.protocols:
        for train, test, own in layouts:
            for arm in with_dp_arms(opts.fed_arms, opts):
                add("pooled", arm, train, test, internal=own)
    for pu in plan:  # every unit's experiment is valid (DP refusals included) before anything runs
        arm_config(cfg, pu.unit.arm, pu.planned_epochs(settings))
    return plan


def federation_layouts(opts: SimConfig, centres: list[str]) -> list[tuple[list[str], list[str], bool]]:
    """(training centres, test centres, tested on their own splits) of the federated and pooled
    units: each held-out centre against the rest (``held_out``: >= 3 centres), or every centre
    training and each tested on its own held-back split (``own_split``: >= 2 centres)."""
    if opts.test_on == "own_split":
        return [(centres, centres, True)] if len(centres) >= 2 else []
    unknown = [c for c in opts.held_out if c not in centres]
    if unknown:
        raise ConfigError(f"sim.held_out: {unknown} not among the centres {centres}")
    if len(centres) < 3:  # a federation needs >= 2 training sites besides the held-out one
        return []
    return [([c for c in centres if c != h], [h], False) for h in centres if h in opts.held_out or not opts.held_out]


def check_public_centres(settings: Settings, centres: Sequence[str], train_centre: str) -> tuple[str, ...]:
    """``sim.public_centres`` once checked (ConfigError naming the problem), and that
    ``model.init_from`` names an existing file: both refused before any unit trains."""
    opts, init = settings.sim, settings.experiment.model.init_from
    if init and not Path(init).is_file():
        raise ConfigError(f"model.init_from: {init}: no such file")
    public = tuple(opts.public_centres)
    if not public:
        return public
    unknown = [c for c in public if c not in centres]
    if unknown:
        raise ConfigError(f"sim.public_centres: {unknown} not among the centres {list(centres)}")
    if "paper" in opts.protocols and train_centre in public:
        raise ConfigError(f"sim.public_centres: the training centre {train_centre!r} is the private site, "
                          "it cannot also be public")
    if init:
        raise ConfigError(f"sim.public_centres and model.init_from ({init}) both set the initial "
                          "weights: give one")
    others = [p for p in opts.protocols if p != "paper"]
    if others:
        log.warning("sim.public_centres applies to the paper protocol only; %s train from the "
                    "usual initialisation", others)
    return public


@dataclass(frozen=True)
class Runtime:
    """Where units run: the sites by name, the tensor cache and scratch folders, the device."""

    sites: Mapping[str, SiteSpec]
    cache_dir: str | None
    scratch: Path
    device: str = "auto"
    progress: bool = True


# ------------------------------------------------------------------------------- metrics
def metric_rows(per_image: pd.DataFrame, summary: Mapping[str, float], test_centre: str, classify: bool,
                n_boot: int, seed: int, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Tidy rows (test_centre, metric, value, ci_low, ci_high, n) of one test centre.

    Dice/IoU/HD95 (px) over lesion images; HD95 in mm when every lesion image has a spacing;
    classification metrics over all images, left out for arms without a classification loss
    (their head is untrained); ``threshold`` decides malignancy (``inference.threshold``).
    CIs: percentile bootstrap over images (``common.metrics``)."""
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
    decided = p >= threshold
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
