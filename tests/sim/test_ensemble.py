"""sim/units.py scoring through common.inference, the saved unit models, and sim/ensemble.py:
the mean of an arm's seeds scored as one more unit, on tiny synthetic centres."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.synthetic import SYNTHETIC_CENTRES
from common.federation import SiteSpec
from common.loaded_model import load_model
from common.settings import load_settings
from sim.ensemble import ENSEMBLE_SEED, ensemble_plan, score_ensembles
from sim.protocols import Runtime, plan_units
from sim.units import model_file, run_unit

CENTRES = list(SYNTHETIC_CENTRES)[:2]


@dataclass
class Folder:
    """What score_ensembles needs of a run folder."""

    path: Path
    done: set[str] = field(default_factory=set)

    def completed_units(self) -> set[str]:
        return set(self.done)


def settings(*overrides: str):
    return load_settings("smoke", ["sim.protocols=[paper]", "sim.arms=[multitask]", "sim.seeds=[3, 4]",
                                   "sim.bootstrap=20", *overrides])


def runtime(tmp_path: Path) -> Runtime:
    sites = {c: SiteSpec(name=c, synthetic_centre=c, synthetic_n=24) for c in CENTRES}
    return Runtime(sites=sites, cache_dir=None, scratch=tmp_path / "federated", device="cpu", progress=False)


def test_the_plan_ensembles_arms_with_several_seeds_but_no_dp_arm():
    s = settings("sim.arms=[multitask, consistency]", "sim.epsilons=[3]")
    ens = ensemble_plan(plan_units(s, CENTRES, CENTRES[0]))
    assert [e.unit.arm for e, _ in ens] == ["multitask-ens", "consistency-ens"]
    planned, members = ens[0]
    unit = planned.unit
    assert unit.seed == ENSEMBLE_SEED and [m.unit.seed for m in members] == [3, 4]
    assert unit.protocol == "paper" and unit.train_set == CENTRES[0] and unit.key.endswith("__s-1")
    assert ensemble_plan(plan_units(settings("sim.seeds=[3]"), CENTRES, CENTRES[0])) == []


def test_units_save_their_models_and_the_ensemble_is_their_mean(tmp_path, caplog):
    s, rt = settings("inference.ensemble=true"), runtime(tmp_path)
    plan = plan_units(s, CENTRES, CENTRES[0])
    outs = {pu.unit.key: run_unit(pu, s, rt, run_dir=tmp_path) for pu in plan}
    for pu in plan:
        (member,) = load_model(model_file(tmp_path, pu.unit)).members
        cfg, meta = member.config, member.metadata
        assert list(meta["data"]["centres"]) == [CENTRES[0]] and meta["feature_stats"]["n_lesions"] > 0
        assert cfg.train.seed == pu.unit.seed and cfg.loss.consistency == 0.0  # the unit's own experiment
    folder = Folder(tmp_path, set(outs))
    (got,) = list(score_ensembles(plan, folder, s, rt))
    unit, out = got
    assert (unit.arm, unit.seed) == ("multitask-ens", -1)
    assert set(out.results["metric"]) >= {"dice", "auc"} and set(out.results["test_centre"]) == {CENTRES[1]}
    assert (out.results["arm"] == "multitask-ens").all() and out.curves.empty
    # no view, so the ensemble's malignancy is the mean of the members' (same images, same order)
    members = [outs[pu.unit.key].per_image["p_malignant"].to_numpy() for pu in plan]
    np.testing.assert_allclose(out.per_image["p_malignant"].to_numpy(), np.mean(members, axis=0), atol=1e-5)
    assert list(out.per_image["case_id"]) == list(outs[plan[0].unit.key].per_image["case_id"])
    manifest = load_model(model_file(tmp_path, unit).with_suffix(".yaml"))  # what fedbus-predict takes
    assert [m.config.train.seed for m in manifest.members] == [3, 4] and manifest.inference.ensemble
    # nothing again once written, nothing with a member missing, nothing unless asked for
    assert list(score_ensembles(plan, Folder(tmp_path, set(outs) | {unit.key}), s, rt)) == []
    assert list(score_ensembles(plan, Folder(tmp_path, {plan[0].unit.key}), s, rt)) == []
    assert list(score_ensembles(plan, folder, settings(), rt)) == []
    model_file(tmp_path, plan[1].unit).unlink()  # e.g. a unit of an older run folder
    assert list(score_ensembles(plan, folder, s, rt)) == []
    assert "members without a finished unit or model file" in caplog.text


def test_inference_changes_the_scoring_not_the_training(tmp_path):
    rt = runtime(tmp_path)
    base = settings("sim.seeds=[3]")
    tta = settings("sim.seeds=[3]", "inference.flip=true", "inference.depth_shifts=[0.25, 0.5]",
                   "inference.largest_component=true")
    (pu,) = plan_units(base, CENTRES, CENTRES[0])
    raw, views = run_unit(pu, base, rt), run_unit(pu, tta, rt)
    pd.testing.assert_frame_equal(raw.curves, views.curves)  # same training, same selection
    assert list(raw.per_image["case_id"]) == list(views.per_image["case_id"])
    assert not np.allclose(raw.per_image["p_malignant"], views.per_image["p_malignant"])  # mirror averaged
    assert math.isfinite(views.results.query("metric == 'dice'")["value"].iloc[0])
