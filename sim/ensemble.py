"""Ensembles of the seeds: the mean of the models an arm trained with different seeds, scored as
one more unit of the run, with its manifest ``models/<unit key>.yaml`` (``common.modelfile``)
naming the members' files, which the predict command takes as one model.

With ``inference.ensemble`` set, every paper-protocol arm that ran with two or more seeds gets
the unit ``Unit("paper", "<arm>-ens", <train set>, seed=-1)``: its saved models
(``sim.units.model_file``) are loaded, their probabilities averaged by ``common.inference`` with
the experiment's views and post-processing, and scored on the arm's test centres with the same
code as a single model. The arm name carries the suffix, not the seed, so the report's means
over seeds never mix an ensemble with its members; seed −1 says "no single seed". DP arms get no
ensemble: k members that each spent ε on the same images release k·ε together.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch

from common.config import ExperimentConfig
from common.inference import build_predictor
from common.loaded_model import load_model, write_ensemble
from common.settings import Settings
from sim.protocols import ENSEMBLE_SUFFIX, PlannedUnit, Runtime, split_dp_arm
from sim.runfolder import Unit
from sim.units import UnitOutput, model_file, score_centres, unit_config

log = logging.getLogger(__name__)

ENSEMBLE_SEED = -1
#: Protocols whose seeds are ensembled (the published external validation).
PROTOCOLS: tuple[str, ...] = ("paper",)


class _Folder(Protocol):
    path: Path

    def completed_units(self) -> set[str]: ...


def ensemble_plan(plan: Sequence[PlannedUnit]) -> list[tuple[PlannedUnit, list[PlannedUnit]]]:
    """(the ensemble's unit, its members) for every arm × train set of ``PROTOCOLS`` planned
    with two or more seeds, DP arms left out; in plan order."""
    groups: dict[tuple[str, str, str], list[PlannedUnit]] = {}
    for pu in plan:
        u = pu.unit
        if u.protocol in PROTOCOLS and math.isinf(split_dp_arm(u.arm)[1]):
            groups.setdefault((u.protocol, u.arm, u.train_set), []).append(pu)
    out = []
    for (protocol, arm, train_set), members in groups.items():
        if len({m.unit.seed for m in members}) < 2:
            continue
        unit = Unit(protocol, f"{arm}{ENSEMBLE_SUFFIX}", train_set, ENSEMBLE_SEED)
        first = members[0]
        out.append((PlannedUnit(unit, first.train_sites, first.test_sites, first.internal_test), members))
    return out


def load_member(path: Path) -> tuple[torch.nn.Module, ExperimentConfig, float]:
    """(network with the saved weights, in eval mode; its experiment; its malignancy
    temperature) of a unit's model file (``common.modelfile``, verified)."""
    (member,) = load_model(path).members
    return member.network(channels_last=member.config.train.channels_last), member.config, member.temperature


def ensemble_predictor(members: Sequence[PlannedUnit], run_dir: Path, settings: Settings,
                       ) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The predictor of ``members``' saved models and the experiment it is scored with."""
    loaded = [load_member(model_file(run_dir, m.unit)) for m in members]
    cfg = unit_config(members[0], settings)
    sizes = [c.data.image_size for _, c, _ in loaded]
    return build_predictor([m for m, _, _ in loaded], cfg.inference, sizes,
                           temperatures=[t for _, _, t in loaded]), cfg


def score_ensembles(plan: Sequence[PlannedUnit], folder: _Folder, settings: Settings, rt: Runtime,
                    ) -> Iterator[tuple[Unit, UnitOutput]]:
    """(ensemble unit, its output) for each ensemble of ``ensemble_plan(plan)`` not yet in the
    folder's results, once every member is complete with its model saved; nothing unless
    ``inference.ensemble``. Write each with ``folder.write_unit`` as it comes."""
    if not settings.experiment.inference.ensemble:
        return
    done = folder.completed_units()
    for ens, members in ensemble_plan(plan):
        if ens.unit.key in done:
            continue
        missing = [m.unit.key for m in members
                   if m.unit.key not in done or not model_file(folder.path, m.unit).is_file()]
        if missing:
            log.warning("%s: skipped, members without a finished unit or model file: %s",
                        ens.unit.key, ", ".join(missing))
            continue
        t0 = time.perf_counter()
        predictor, cfg = ensemble_predictor(members, folder.path, settings)
        write_ensemble(model_file(folder.path, ens.unit).with_suffix(".yaml"),
                       [model_file(folder.path, m.unit) for m in members], cfg.inference, ens.unit.key)
        seed = min(m.unit.seed for m in members)  # bootstrap seed; the unit's own is −1
        rows, images = [], []
        for s in score_centres(predictor, ens, cfg, settings.sim, rt, seed=seed):
            rows += s.rows
            images.append(s.result.per_image.assign(test_centre=s.centre))
        results = pd.DataFrame(rows).assign(**ens.unit.columns())
        log.info("%s: %d members scored as one", ens.unit.key, len(members))
        yield ens.unit, UnitOutput(results, pd.concat(images, ignore_index=True), pd.DataFrame(),
                                   seconds=time.perf_counter() - t0)
