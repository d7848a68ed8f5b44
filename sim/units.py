"""Running one unit: train it (centralised here, federated in sim/federated.py), then score the
trained model on each of its test centres with the same code for every arm and protocol.

Centralised DP arms use the federated sites' path: one ``common.privacy.PrivacySession`` over
the whole training (``planned_epochs`` = the unit's epochs, so σ is planned as
``make_private_with_epsilon`` would), passed to ``common.train.train_local(privacy=...)``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.config import ExperimentConfig, replace
from common.data.splits import split_cases
from common.data.tensors import TensorData, to_tensors
from common.device import resolve_device, seed_everything
from common.evaluate import predict, score
from common.federation import build_experiment_model
from common.nets.efficientnet import fold_affine
from common.privacy import PrivacySession
from common.sitedata import load_site_tensors, load_test_tensors, site_cases
from common.train import train_local
from common.tta import DepthShiftTTA
from sim.examples import merge_examples, pick_examples
from sim.federated import run_federated
from sim.protocols import LcoOptions, PlannedUnit, Runtime, arm_config, metric_rows
from sim.selection import EpochSelector

log = logging.getLogger(__name__)


@dataclass
class UnitOutput:
    results: pd.DataFrame
    per_image: pd.DataFrame
    curves: pd.DataFrame
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Trained:
    """A unit's trained model and what its training says about it."""

    model: torch.nn.Module
    curves: pd.DataFrame
    epsilon: float = math.nan  # DP-SGD ε spent (the largest over sites when federated); NaN: no DP
    num_train: int = 0


def unit_config(pu: PlannedUnit, cfg: ExperimentConfig, opts: LcoOptions) -> ExperimentConfig:
    """The unit's experiment: its arm (DP arms planned over the unit's epochs) and seed."""
    arm_cfg = arm_config(cfg, pu.unit.arm, pu.planned_epochs(opts, cfg))
    return replace(arm_cfg, **{"train.seed": pu.unit.seed})


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
    """Train one unit and evaluate it on its test centres. DP units add an ``epsilon`` row (ε
    spent, n = training images) per test centre."""
    t0 = time.perf_counter()
    cfg = unit_config(pu, cfg, opts)
    device = resolve_device(rt.device)
    internal = None
    if pu.federated:
        model, curves, spent = run_federated(pu, cfg, opts, rt)
        n_train = sum(len(load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir)[0])
                      for c in pu.train_sites) if cfg.privacy.enabled else 0
        trained = Trained(model, curves, spent, n_train)
    else:
        train, val, internal = training_data(pu, cfg, opts, rt)
        trained = train_centralised(pu, cfg, train, val, rt, opts.selection)
    model = trained.model
    net = fold_affine(model)  # a frozen-BatchNorm encoder predicts faster folded (same outputs)
    scorer = DepthShiftTTA(net, opts.depth_tta) if opts.depth_tta else net  # selection stays raw
    rows: list[dict[str, Any]] = []
    images: list[pd.DataFrame] = []
    examples: list[dict[str, np.ndarray]] = []
    for centre in pu.test_sites:
        own = internal is not None and centre in pu.train_sites
        data = internal if own else load_test_tensors(rt.sites[centre], cfg.data, rt.cache_dir)
        probs, p_mal = predict(scorer, data, cfg.train.batch_size, device)
        result = score(probs, p_mal, data)
        rows += metric_rows(result.per_image, result.summary, centre, cfg.loss.cls_weight > 0,
                            opts.bootstrap, pu.unit.seed)
        if cfg.privacy.enabled:
            rows.append({"test_centre": centre, "metric": "epsilon", "value": trained.epsilon,
                         "ci_low": math.nan, "ci_high": math.nan, "n": trained.num_train})
        images.append(result.per_image.assign(test_centre=centre))
        examples.append(pick_examples(model, data, probs, p_mal, result.per_image, opts.examples_per_centre, centre))
    results = pd.DataFrame(rows).assign(**pu.unit.columns())
    return UnitOutput(results, pd.concat(images, ignore_index=True), trained.curves,
                      merge_examples(examples), time.perf_counter() - t0)


def train_centralised(pu: PlannedUnit, cfg: ExperimentConfig, train: TensorData, val: TensorData,
                      rt: Runtime, selection: str = "best_val") -> Trained:
    """Train from the seed's initialisation, scoring the validation split after every epoch and
    keeping the epoch ``selection`` picks (sim/selection.py). Curves: loss, validation Dice/AUC
    and score per epoch, ``selected`` marking the kept epoch."""
    seed_everything(cfg.train.seed)
    model = build_experiment_model(cfg)
    device = resolve_device(rt.device)
    selector = EpochSelector(selection, classify=cfg.loss.cls_weight > 0)
    session = None
    if cfg.privacy.enabled:
        session = PrivacySession(cfg.privacy, num_examples=len(train), batch_size=cfg.train.batch_size,
                                 epochs=cfg.train.epochs, site=pu.unit.key)

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        summary = score(*predict(model, val, cfg.train.batch_size, device), val).summary if len(val) else {}
        selector.update(epoch, record["loss"], summary, model)

    try:
        train_local(model, train, replace(cfg.train, progress=rt.progress), cfg.loss, privacy=session,
                    device=device, augment=cfg.data.train_augmentation, desc=pu.unit.key,
                    on_epoch_end=on_epoch_end)
    finally:
        if session is not None:
            session.close()
    epoch = selector.restore(model)
    spent = session.epsilon() if session is not None else math.nan
    log.info("%s: kept epoch %d of %d (%s)%s", pu.unit.key, epoch, cfg.train.epochs, selection,
             f", DP-SGD eps={spent:.3f} (sigma={session.noise_multiplier:.3f})" if session else "")
    return Trained(model, selector.curves(), spent, len(train))
