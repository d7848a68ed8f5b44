"""sim/units.py calibration: a centralised unit fits its temperature on its training centre's
data, saves it in its model file, scores with it, and reports ECE/Brier before and after per
test centre (result rows and model card)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import calibration
from common.federation import SiteSpec
from common.modelcard import card_paths
from common.loaded_model import load_model
from common.sitedata import load_site_tensors
from sim.protocols import Runtime, plan_units
from sim.units import model_file, run_unit
from tests.sim.test_ensemble import CENTRES, settings

CAL_METRICS = {"ece_raw", "ece", "brier_raw", "brier", "temperature"}


def runtime(tmp_path: Path, n: int = 48) -> Runtime:
    sites = {c: SiteSpec(name=c, synthetic_centre=c, synthetic_n=n) for c in CENTRES}
    return Runtime(sites=sites, cache_dir=None, scratch=tmp_path / "federated", device="cpu", progress=False)


def test_a_centralised_unit_is_calibrated_on_its_validation_split_and_reports_before_after(tmp_path) -> None:
    s, rt = settings("sim.seeds=[3]", "data.val_fraction=0.4"), runtime(tmp_path, n=64)  # >= 20 to fit on
    (pu,) = plan_units(s, CENTRES, CENTRES[0])
    out = run_unit(pu, s, rt, run_dir=tmp_path)
    res = out.results.set_index("metric")
    assert CAL_METRICS <= set(res.index) and {"dice", "auc"} <= set(res.index)  # the old rows kept
    assert (res.loc[list(CAL_METRICS), "n"] == len(out.per_image)).all()
    (member,) = load_model(model_file(tmp_path, pu.unit)).members
    t = member.temperature
    assert res.loc["temperature", "value"] == pytest.approx(t)
    cal = member.metadata["calibration"]
    _, val = load_site_tensors(rt.sites[CENTRES[0]], member.config.data)
    assert cal["split"] == "validation" and cal["centres"] == {CENTRES[0]: len(val)} and cal["fitted"]
    # the same temperature by hand, from the saved network on the validation split
    stats = calibration.model_stats(member.network(), val, member.config.inference)
    assert t == pytest.approx(calibration.fit_temperature(stats), rel=1e-6) and t != 1.0
    # the scored probabilities are the calibrated ones; "raw" undoes T
    y, p = out.per_image["malignant"].to_numpy(float), out.per_image["p_malignant"].to_numpy(float)
    raw = 1 / (1 + np.exp(-t * np.log(p / (1 - p))))
    assert res.loc["brier", "value"] == pytest.approx(np.mean((p - y) ** 2))
    assert res.loc["brier_raw", "value"] == pytest.approx(np.mean((raw - y) ** 2), rel=1e-4)
    card = json.loads(card_paths(model_file(tmp_path, pu.unit))["json"].read_text())
    (centre,) = card["evaluation"]["centres"]
    assert centre["calibration"]["ece_raw"] == pytest.approx(res.loc["ece_raw", "value"])
    assert centre["calibration"]["ece"] == pytest.approx(res.loc["ece", "value"])


def test_a_run_without_validation_images_is_not_calibrated(tmp_path) -> None:
    """On its own training images the fit left external ECE the same or worse: T stays 1."""
    s, rt = settings("sim.seeds=[3]", "data.val_fraction=0"), runtime(tmp_path)
    (pu,) = plan_units(s, CENTRES, CENTRES[0])
    out = run_unit(pu, s, rt, run_dir=tmp_path)
    res = out.results.set_index("metric")
    assert res.loc["temperature", "value"] == 1.0 and res.loc["ece", "value"] == res.loc["ece_raw", "value"]
    (member,) = load_model(model_file(tmp_path, pu.unit)).members
    assert member.temperature == 1.0 and member.metadata["calibration"] is None
    card = json.loads(card_paths(model_file(tmp_path, pu.unit))["json"].read_text())
    assert "kept none" in card["calibration"]["text"]


def test_a_federated_unit_sums_its_sites_statistics(tmp_path) -> None:
    from types import SimpleNamespace

    import torch

    from common.federation import build_experiment_model
    from sim.units import Trained, calibrate_unit

    s, rt = settings("sim.seeds=[3]"), runtime(tmp_path, n=64)
    cfg = s.experiment
    torch.manual_seed(0)
    trained = Trained(build_experiment_model(cfg), curves=None)  # type: ignore[arg-type]
    pu = SimpleNamespace(train_sites=list(CENTRES), federated=True, unit=SimpleNamespace(key="fed"))
    calibrate_unit(trained, pu, cfg, rt)  # type: ignore[arg-type]
    vals = {c: load_site_tensors(rt.sites[c], cfg.data)[1] for c in CENTRES}  # val_fraction > 0
    per_site = [calibration.model_stats(trained.model, v, cfg.inference) for v in vals.values()]
    merged = calibration.merge(per_site)
    assert trained.calibration["centres"] == {c: len(v) for c, v in vals.items()}
    assert trained.calibration["split"] == "validation" and trained.calibration["federated"] is True
    assert trained.calibration["n"] == merged.count >= calibration.MIN_COUNT
    assert trained.temperature == pytest.approx(calibration.fit_temperature(merged))
