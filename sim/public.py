"""Public → private in the simulation (``sim.public_centres``): the paper protocol's arms start
from a model trained without DP on public centres, then fine-tune on the training centre (with
DP-SGD in the ``-eps`` arms), as a hospital would fine-tune a published model privately.

One public model per (base arm, seed): ``<run folder>/public/public__<arm>__<centres>__s<seed>.pt``
(a ``common.modelfile`` file), trained once like a pooled centralised unit on the public
centres (their validation splits select the epoch as ``sim.selection`` says), for
``sim.public_epochs`` epochs at ``sim.public_lr`` (defaults: ``train.epochs``, ``train.lr``),
without DP, and reused by every arm
of that seed with the same base (``consistency`` and ``consistency-eps3`` share one) and on
resume. Two workers that need the same file at once do not both train it: the first holds a
lock beside it (``flock``), the second waits and then reuses the file.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from common.config import ExperimentConfig, TrainConfig, replace
from common.modelfile import save_model
from common.settings import Settings, SimConfig
from sim.protocols import PlannedUnit, Runtime, arm_config, split_dp_arm
from sim.runfolder import Unit

log = logging.getLogger(__name__)

PUBLIC_DIR = "public"
PUBLIC_PROTOCOL = "public"


def public_unit(pu: PlannedUnit, settings: Settings) -> PlannedUnit:
    """The pretraining of ``pu``'s public model: its base arm (no DP) on the public centres."""
    base, _eps = split_dp_arm(pu.unit.arm)
    centres = tuple(settings.sim.public_centres)
    return PlannedUnit(Unit(PUBLIC_PROTOCOL, base, "+".join(centres), pu.unit.seed), centres, ())


def public_recipe(opts: SimConfig, train: TrainConfig) -> tuple[int, float]:
    """(epochs, peak lr) of the public pretraining: ``sim.public_*``, else the run's own."""
    return opts.public_epochs or train.epochs, opts.public_lr or train.lr


def public_config(pu: PlannedUnit, settings: Settings) -> ExperimentConfig:
    """The public pretraining's experiment: the base arm without DP, its own epoch count."""
    public = public_unit(pu, settings)
    cfg = arm_config(settings.experiment, public.unit.arm)
    epochs, lr = public_recipe(settings.sim, cfg.train)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    return replace(cfg, **{"train.seed": pu.unit.seed, "train.epochs": epochs, "train.lr": lr,
                           "model.init_from": None})


#: Trains a unit's public model: (the public unit, its config) → (model, {centre: {"train": n, "val": n}}).
FitPublic = Callable[[PlannedUnit, ExperimentConfig], tuple[nn.Module, dict[str, dict[str, int]]]]


def public_model(pu: PlannedUnit, settings: Settings, fit: FitPublic, folder: Path) -> Path:
    """The public model file of ``pu`` (trained now by ``fit`` unless the file is there already)."""
    public = public_unit(pu, settings)
    path = folder / PUBLIC_DIR / f"{public.unit.key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if training fails
        if path.is_file():
            log.info("%s: public model %s reused", pu.unit.key, path)
            return path
        return _train_public(pu, public, path, settings, fit)


def _train_public(pu: PlannedUnit, public: PlannedUnit, path: Path, settings: Settings,
                  fit: FitPublic) -> Path:
    cfg = public_config(pu, settings)
    log.info("%s: pretraining without DP on the public centres %s (%d epochs)",
             pu.unit.key, "+".join(public.train_sites), cfg.train.epochs)
    model, centres = fit(public, cfg)
    return save_model(path, model, cfg, name=public.unit.key,
                      description=f"public pretraining for {settings.description}".strip(),
                      data={"centres": centres}, epsilon=None,
                      source={"kind": "simulation", "stage": "public", **public.unit.columns()})


def with_public_init(pu: PlannedUnit, cfg: ExperimentConfig, settings: Settings, rt: Runtime,
                     run_dir: str | Path | None, fit: FitPublic) -> ExperimentConfig:
    """``cfg`` starting from the public model (paper protocol with ``sim.public_centres``), else
    ``cfg`` itself."""
    if not settings.sim.public_centres or pu.unit.protocol != "paper":
        return cfg
    folder = Path(run_dir) if run_dir is not None else rt.scratch
    return replace(cfg, **{"model.init_from": str(public_model(pu, settings, fit, folder).resolve())})
