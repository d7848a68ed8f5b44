"""Running one unit: train it (centralised here, federated in sim/federated.py), calibrate its
malignancy output, save the final model to the run folder, then score it on each of its test
centres through the one prediction path (``common.inference``, as ``inference`` of the
experiment says) with the same code for every arm and protocol; ``sim/ensemble.py`` scores the
saved models of several seeds as one.

Calibration (``common.calibration``): every unit with a trained classification head fits its
temperature on its training centres' validation split (``data.val_fraction`` > 0) or else their
training split; a federated unit sums its sites' grid statistics as the deployment's server
does. The temperature is saved in the model file and applied when scoring; each test centre also
gets ``ece_raw``/``ece`` and ``brier_raw``/``brier`` rows (10 bins, before/after; the "before"
probabilities are the scored ones with the temperature undone, sigmoid(T·logit(p))) and a
``temperature`` row.

Centralised DP arms use the federated sites' path: one ``common.privacy.PrivacySession`` over
the whole training (``planned_epochs`` = the unit's epochs, so σ is planned as
``make_private_with_epsilon`` would), passed to ``common.train.train_local(privacy=...)``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common import calibration
from common.config import ExperimentConfig, replace
from common.data.tensors import TensorData
from common.device import resolve_device, seed_everything
from common.evaluate import EvalResult, predict, score
from common.federation import build_experiment_model
from common.inference import build_predictor
from common.inference import predict as predict_with
from common.modelcard import centre_evaluation
from common.modelfile import feature_stats, save_model, write_card_for
from common.privacy import PrivacySession
from common.settings import Settings, SimConfig
from common.sitedata import load_own_test_tensors, load_site_tensors, load_test_tensors
from common.train import train_local
from sim.examples import merge_examples, pick_examples
from sim.feature_check import with_prior_features
from sim.federated import run_federated
from sim.protocols import PlannedUnit, Runtime, arm_config, metric_rows
from sim.public import with_public_init
from sim.runfolder import Unit
from sim.selection import EpochSelector

log = logging.getLogger(__name__)

#: Folder of the units' final models inside a run folder (``model_file``).
MODELS_DIR = "models"


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
    site_epsilon: dict[str, tuple[float, int]] = field(default_factory=dict)  # federated DP: (ε, N) per site
    temperature: float = 1.0  # of the malignancy logit (``calibrate_unit``)
    calibration: dict[str, Any] | None = None  # how it was fitted (``common.calibration.summary``)


@dataclass
class Scored:
    """One test centre scored: its data, the predictions and their metrics (tidy ``rows``)."""

    centre: str
    data: TensorData
    probs: np.ndarray  # mask probabilities (N,1,S,S), post-processed
    p_mal: np.ndarray  # malignancy probabilities (N,)
    result: EvalResult
    rows: list[dict[str, Any]]


def model_file(run_dir: str | Path, unit: Unit) -> Path:
    """The unit's final model in its run folder (a ``common.modelfile`` file holding the unit's
    resolved experiment, so ``sim/ensemble.py`` and the predict command rebuild it as trained)."""
    return Path(run_dir) / MODELS_DIR / f"{unit.key}.pt"


def save_unit_model(path: Path, pu: PlannedUnit, cfg: ExperimentConfig, settings: Settings, rt: Runtime,
                    trained: Trained, data: tuple[TensorData, TensorData] | None = None) -> Path:
    """Write the unit's model file: its experiment, the centres and counts it trained on and,
    for a centralised unit without DP (``data``: its (train, val); the trainer holds the
    images), the training lesions' feature percentiles."""
    stats, fingerprint = None, {}
    if data is None:  # federated: the sites' split sizes
        pairs = {c: load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir) for c in pu.train_sites}
        fingerprint["centres"] = {c: {"train": len(t), "val": len(v)} for c, (t, v) in pairs.items()}
    else:
        train, val = data
        fingerprint["centres"] = {c: {"train": train.centres.count(c), "val": val.centres.count(c)}
                                  for c in pu.train_sites}
        fingerprint["train_hash"] = train.fingerprint()  # a digest of the tensors: names nothing
        if not cfg.privacy.enabled:  # percentiles are not covered by the DP guarantee
            stats = feature_stats(train.images, train.masks)
    init = {"init_from": cfg.model.init_from} if cfg.model.init_from else {}
    # the file holds every weight: rebuilding it (predict, ensembles) must not need init_from's file
    return save_model(path, trained.model, replace(cfg, **{"model.init_from": None}), name=pu.unit.key,
                      description=settings.description, data=fingerprint, stats=stats, epsilon=trained.epsilon,
                      source={"kind": "simulation", "federated": pu.federated, **pu.unit.columns(), **init},
                      temperature=trained.temperature, calibration=trained.calibration)


def calibrate_unit(trained: Trained, pu: PlannedUnit, cfg: ExperimentConfig, rt: Runtime,
                   data: tuple[TensorData, TensorData] | None = None) -> None:
    """Fit ``trained``'s malignancy temperature in place (``common.calibration``) on the
    training centres' validation split; without one (``val_fraction`` 0) T stays 1. ``data``: a centralised
    unit's pooled (train, val); None: federated, each site's own statistics summed. An untrained
    classification head (``loss.cls_weight`` 0) stays at T = 1."""
    if cfg.loss.cls_weight <= 0 or not calibration.calibrates(cfg.data):
        return
    device, bs = resolve_device(rt.device), cfg.train.batch_size
    if data is None:
        parts = {c: calibration.calibration_split(*load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir), cfg.data)[0]
                 for c in pu.train_sites}
        stats = calibration.merge(calibration.model_stats(trained.model, d, cfg.inference, bs, device)
                                  for d in parts.values())
        counts = {c: len(d) for c, d in parts.items()}
        split = calibration.split_name(cfg.data)
    else:
        fit_on, split = calibration.calibration_split(*data, cfg.data)
        stats = calibration.model_stats(trained.model, fit_on, cfg.inference, bs, device)
        counts = {c: fit_on.centres.count(c) for c in pu.train_sites}
    trained.temperature = calibration.fit_temperature(stats)
    trained.calibration = {**calibration.summary(stats, trained.temperature, split, counts),
                           "federated": pu.federated}
    log.info("%s: malignancy temperature %.3f (fitted on the %s split, %d images)", pu.unit.key,
             trained.temperature, split, stats.count)


def calibration_rows(s: Scored, temperature: float) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(rows ece_raw, ece, brier_raw, brier, temperature of one scored centre, the uncalibrated
    probabilities (N,)): the scored probabilities are the calibrated ones."""
    pi = s.result.per_image
    y, p = pi["malignant"].to_numpy(float), pi["p_malignant"].to_numpy(float)
    p_raw = calibration.apply_temperature(p, 1.0 / temperature) if temperature != 1.0 else p
    values = {**calibration.before_after(y, p_raw, p), "temperature": temperature}
    rows = [{"test_centre": s.centre, "metric": k, "value": float(v), "ci_low": math.nan, "ci_high": math.nan,
             "n": len(y)} for k, v in values.items()]
    return rows, p_raw


def unit_evaluation(s: Scored, classify: bool, p_raw: np.ndarray | None = None) -> dict[str, Any]:
    """One scored centre for the model card; calibration only when the classification head was
    trained (``classify``); ``p_raw``: the probabilities before calibration."""
    pi = s.result.per_image
    y, p = (pi["malignant"].to_numpy(float), pi["p_malignant"].to_numpy(float)) if classify else (None, None)
    return centre_evaluation(s.centre, s.rows, y, p, p_uncalibrated=p_raw if classify else None)


def evaluation_note(pu: PlannedUnit) -> str:
    """What the card's test centres are: external, or the training centre's own test split."""
    kinds = [f"{c} ({'internal held-out test split' if pu.internal_test and c in pu.train_sites else 'external'})"
             for c in pu.test_sites]
    return ("Scored in the simulation on: " + ", ".join(kinds) + ". CIs: percentile bootstrap over images; "
            "Dice over lesion images, AUC over all images.")


def unit_config(pu: PlannedUnit, settings: Settings) -> ExperimentConfig:
    """The unit's experiment: its arm (DP arms planned over the unit's epochs) and seed; a unit
    tested on its centres' own splits holds them back (``data.test_fraction``) from training."""
    arm_cfg = arm_config(settings.experiment, pu.unit.arm, pu.planned_epochs(settings))
    own = {"data.test_fraction": settings.sim.reference_test_fraction} if pu.internal_test else {}
    return replace(arm_cfg, **{"train.seed": pu.unit.seed, **own})


def training_data(pu: PlannedUnit, cfg: ExperimentConfig, rt: Runtime) -> tuple[TensorData, TensorData]:
    """(train, val) of a centralised unit, pooled over its training centres; each centre's own
    test split (``data.test_fraction``, set by ``unit_config``) is held back."""
    pairs = [load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir) for c in pu.train_sites]
    return TensorData.concat([p[0] for p in pairs]), TensorData.concat([p[1] for p in pairs])


def score_centres(predictor: torch.nn.Module, pu: PlannedUnit, cfg: ExperimentConfig, opts: SimConfig,
                  rt: Runtime, seed: int = 0) -> Iterator[Scored]:
    """Score ``predictor`` (``common.inference.build_predictor``) on each test centre of ``pu``,
    with ``cfg.inference``'s post-processing and threshold; ``internal``: the training centre's
    own test split (local-only diagonal). ``seed``: of the bootstrap CIs."""
    device = resolve_device(rt.device)
    t = cfg.inference.threshold
    for centre in pu.test_sites:
        own = pu.internal_test and centre in pu.train_sites
        load = load_own_test_tensors if own else load_test_tensors
        data = load(rt.sites[centre], cfg.data, rt.cache_dir)
        probs, p_mal = predict_with(predictor, data, cfg.inference, cfg.train.batch_size, device)
        result = score(probs, p_mal, data, threshold=t, mask_threshold=t)
        rows = metric_rows(result.per_image, result.summary, centre, cfg.loss.cls_weight > 0,
                           opts.bootstrap, seed, t)
        yield Scored(centre, data, probs, p_mal, result, rows)


def fit_public(public: PlannedUnit, cfg: ExperimentConfig, settings: Settings, rt: Runtime,
               ) -> tuple[torch.nn.Module, dict[str, dict[str, int]]]:
    """A public pretraining unit trained like a pooled centralised one (``sim.public``)."""
    train, val = training_data(public, cfg, rt)
    trained = train_centralised(public, cfg, train, val, rt, settings.sim.selection)
    return trained.model, {c: {"train": train.centres.count(c), "val": val.centres.count(c)}
                           for c in public.train_sites}


def run_unit(pu: PlannedUnit, settings: Settings, rt: Runtime, run_dir: str | Path | None = None,
             ) -> UnitOutput:
    """Train one unit, calibrate it (``calibrate_unit``), save its model to
    ``model_file(run_dir, unit)`` (when ``run_dir`` is given) and evaluate it on its test
    centres. DP units add an ``epsilon`` row (ε spent, n = training images) per test centre;
    units with a trained classification head add the ``calibration_rows``."""
    t0 = time.perf_counter()
    opts = settings.sim
    cfg = with_public_init(pu, unit_config(pu, settings), settings, rt, run_dir,  # sim.public_centres
                           lambda public, pcfg: fit_public(public, pcfg, settings, rt))
    data = None
    if pu.federated:
        model, curves, spent = run_federated(pu, cfg, settings, rt)
        counts = {c: len(load_site_tensors(rt.sites[c], cfg.data, rt.cache_dir)[0])
                  for c in pu.train_sites} if cfg.privacy.enabled else {}
        trained = Trained(model, curves, max(spent.values(), default=math.nan), sum(counts.values()),
                          site_epsilon={c: (spent[c], n) for c, n in counts.items()})
    else:
        train, val = training_data(pu, cfg, rt)
        trained, data = train_centralised(pu, cfg, train, val, rt, opts.selection), (train, val)
    calibrate_unit(trained, pu, cfg, rt, data)
    model = trained.model
    path = None if run_dir is None else model_file(run_dir, pu.unit)
    if path is not None:
        save_unit_model(path, pu, cfg, settings, rt, trained, data)
    # model selection stayed on the raw model; scoring is the model file's: views and temperature
    predictor = build_predictor([model], cfg.inference, temperatures=[trained.temperature])
    classify = cfg.loss.cls_weight > 0
    rows: list[dict[str, Any]] = []
    images: list[pd.DataFrame] = []
    examples: list[dict[str, np.ndarray]] = []
    evaluation: list[dict[str, Any]] = []
    for s in score_centres(predictor, pu, cfg, opts, rt, pu.unit.seed):
        rows += s.rows
        p_raw = None
        if classify:
            cal_rows, p_raw = calibration_rows(s, trained.temperature)
            rows += cal_rows
        evaluation.append(unit_evaluation(s, classify, p_raw))
        if cfg.privacy.enabled:
            # a site's own test split: the ε that site spent; else the weakest site's guarantee
            eps, n = trained.site_epsilon.get(s.centre, (trained.epsilon, trained.num_train))
            rows.append({"test_centre": s.centre, "metric": "epsilon", "value": eps,
                         "ci_low": math.nan, "ci_high": math.nan, "n": n})
        images.append(with_prior_features(s, model).assign(test_centre=s.centre))
        examples.append(pick_examples(model, s.data, s.probs, s.p_mal, s.result.per_image,
                                      opts.examples_per_centre, s.centre))
    if path is not None:  # the card again, now with the scores
        write_card_for(path, evaluation, evaluation_note(pu))
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
