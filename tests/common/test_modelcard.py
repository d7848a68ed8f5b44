"""common/modelcard.py: the card written beside every model file, its learned-prior sentences, the
privacy statement, per-centre evaluation with calibration, and the Lite0 failure modes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.config import replace
from common.federation import build_experiment_model
from common.modelcard import (
    build_card,
    card_paths,
    centre_evaluation,
    learned_prior,
    privacy_statement,
)
from common.modelfile import read_model, save_model, write_card_for
from common.settings import load_settings

CFG = load_settings("smoke").experiment


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_experiment_model(CFG).eval()


def test_save_model_writes_a_card_beside_the_model(tmp_path, model) -> None:
    path = save_model(tmp_path / "models" / "u1.pt", model, CFG, name="u1", description="smoke test",
                      data={"centres": {"A": {"train": 12, "val": 3}}}, source={"kind": "simulation"})
    paths = card_paths(path)
    assert paths["md"] == tmp_path / "models" / "u1.card.md" and paths["json"].is_file()
    assert not paths["png"].exists()  # no evaluation yet: no reliability diagram
    card = json.loads(paths["json"].read_text())
    assert card["model"] == "u1" and card["training_data"]["centres"] == {"A": {"train": 12, "val": 3}}
    assert card["evaluation"] is None and card["failure_modes"] == []  # smoke is not lite0
    assert card["privacy"]["guarantee"] is False
    assert len(card["learned_prior"]) == len(CFG.loss.features)
    md = paths["md"].read_text()
    assert "Not a diagnostic device" in md and "| A | 12 | 3 |" in md
    assert "What this model learned about malignancy" in md and "No formal privacy guarantee" in md
    read_model(path)  # the card does not touch the verified model file


def test_learned_prior_in_words() -> None:
    prior = {"weights": {"area": 0.8, "margin_sharpness": -0.5, "texture": 0.01, "posterior": -0.3},
             "clinical_sign": {"area": 1, "margin_sharpness": -1, "texture": 1, "posterior": 1}}
    out = learned_prior(prior)
    assert [p["feature"] for p in out] == ["area", "margin_sharpness", "posterior", "texture"]  # by |w|
    assert out[0]["summary"] == "a larger lesion raises the malignancy prior (as BI-RADS expects)"
    assert out[1]["clinical_direction"] == "lowers" and "lowers the malignancy prior (as BI-RADS" in out[1]["summary"]
    assert "against the BI-RADS direction" in out[2]["summary"]
    assert out[3]["summary"].startswith("little effect")


def test_privacy_statement_names_epsilon_delta_or_no_guarantee() -> None:
    dp = privacy_statement({"privacy": {"dp_sgd": True, "epsilon": 2.5, "delta": 1e-5}, "source": {"kind": "deployment"}})
    assert dp["guarantee"] and dp["epsilon"] == 2.5 and "ε = 2.5, δ = 1e-05" in dp["text"]
    assert "any one training image" in dp["text"]
    leaky = privacy_statement({"privacy": {"dp_sgd": True, "epsilon": 4.0, "delta": 1e-5},
                               "feature_stats": {"n_lesions": 3}})
    assert "NOT covered" in leaky["text"]
    none = privacy_statement({"privacy": {"dp_sgd": False}, "source": {"kind": "deployment"}})
    assert not none["guarantee"] and "No formal privacy guarantee" in none["text"] and "federated" in none["text"]


def test_centre_evaluation_keeps_dice_auc_cis_and_calibration_by_hand() -> None:
    rows = [{"metric": "dice", "value": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": 4},
            {"metric": "hd95", "value": 9.0, "ci_low": 7.0, "ci_high": 11.0, "n": 4},
            {"metric": "auc", "value": 1.0, "ci_low": math.nan, "ci_high": math.nan, "n": 4}]
    ev = centre_evaluation("BUSI", rows, [1, 0, 1, 0], [0.9, 0.2, 0.5, 0.0])
    assert set(ev["metrics"]) == {"dice", "auc"}
    assert ev["metrics"]["dice"] == {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": 4}
    assert ev["metrics"]["auc"]["ci_low"] is None
    cal = ev["calibration"]
    assert cal["brier"] == pytest.approx(0.075) and cal["n"] == 4
    # bins: 0.0 → [0,.1) |0-0|; 0.2 → [.2,.3) |0-.2|; 0.5 → [.5,.6) |1-.5|; 0.9 → [.9,1] |1-.9|; each 1/4
    assert cal["ece"] == pytest.approx((0 + 0.2 + 0.5 + 0.1) / 4)
    assert "calibration" not in centre_evaluation("BUSI", rows)  # untrained head: no calibration


def test_card_with_evaluation_draws_the_reliability_diagram(tmp_path, model) -> None:
    path = save_model(tmp_path / "m.pt", model, CFG, name="m")
    ev = [centre_evaluation("BUSI", [{"metric": "dice", "value": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": 4}],
                            [1, 0, 1, 0], [0.9, 0.2, 0.5, 0.0])]
    written = write_card_for(path, ev, "external centre")
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["md"].read_text()
    assert "| BUSI | 0.700 (0.600–0.800), n=4 | — | 0.075 | 0.200 |" in md
    assert "![reliability diagram](m.reliability.png)" in md and "external centre" in md
    write_card_for(path)  # rewritten without an evaluation: the stale diagram goes
    assert not written["png"].exists() and json.loads(written["json"].read_text())["evaluation"] is None


def test_failure_modes_only_for_lite0_and_they_name_the_lab_entries() -> None:
    meta = {"experiment": {"model": {"arch": "lite0"}}, "prior": {}, "privacy": {}}
    fails = build_card(meta)["failure_modes"]
    assert {f["lab"] for f in fails} == {"docs/lab/2026-12-04-lateral-roll.md",
                                         "docs/lab/2026-12-03-detection-gap-near-field-splice.md"}
    assert any("mid-width" in f["text"] for f in fails) and any("fat lobule" in f["text"] for f in fails)
    for doc in {f["lab"] for f in fails}:  # the cited lab entries exist
        assert (Path(__file__).resolve().parents[2] / doc).is_file()
    assert build_card({"experiment": {"model": {"arch": "lite1"}}})["failure_modes"] == []
    assert build_card(replace_arch_meta("small"))["failure_modes"] == []


def replace_arch_meta(arch: str) -> dict:
    """Metadata of the smoke experiment with another architecture name."""
    from common.config import to_dict

    return {"experiment": to_dict(replace(CFG, **{"model.arch": arch}))}


def test_the_deployment_card_lists_the_rounds_per_site_scores(tmp_path, model) -> None:
    from common.federation import FederationConfig, RunSpec, SiteSpec
    from server.state import MetricRow, ServerRunFolder

    spec = RunSpec(experiment=CFG, federation=FederationConfig(rounds=2),
                   sites=(SiteSpec("A", synthetic_centre="SynPL"),), run_dir=str(tmp_path))
    folder = ServerRunFolder(tmp_path)
    folder.append_metrics([MetricRow(1, "evaluate", "A", "dice", 0.1), MetricRow(2, "evaluate", "A", "dice", 0.6),
                           MetricRow(2, "evaluate", "A", "n_lesion", 5), MetricRow(2, "evaluate", "A", "auc", -1.0),
                           MetricRow(2, "evaluate", "all-sites", "dice", 0.6)])
    path = folder.write_model(2, model.state_dict(), spec, "k1")
    card = json.loads(card_paths(path)["json"].read_text())
    (centre,) = card["evaluation"]["centres"]
    assert centre["centre"] == "A (validation)" and "round 2" in card["evaluation"]["note"]
    assert centre["metrics"] == {"dice": {"value": 0.6, "ci_low": None, "ci_high": None, "n": 5}}  # AUC undefined
    assert "| A (validation) | 0.600, n=5 | — |" in card_paths(path)["md"].read_text()


def test_a_simulation_unit_card_holds_its_scores_after_scoring(tmp_path) -> None:
    from sim.protocols import plan_units
    from sim.units import model_file, run_unit
    from tests.sim.test_ensemble import CENTRES, runtime, settings

    s, rt = settings("sim.seeds=[3]"), runtime(tmp_path)
    (pu,) = plan_units(s, CENTRES, CENTRES[0])
    out = run_unit(pu, s, rt, run_dir=tmp_path)
    paths = card_paths(model_file(tmp_path, pu.unit))
    card = json.loads(paths["json"].read_text())
    assert list(card["training_data"]["centres"]) == [CENTRES[0]]
    (centre,) = card["evaluation"]["centres"]
    assert centre["centre"] == CENTRES[1] and f"{CENTRES[1]} (external)" in card["evaluation"]["note"]
    res = out.results.set_index("metric")
    assert centre["metrics"]["dice"]["value"] == pytest.approx(res.loc["dice", "value"])
    assert centre["metrics"]["auc"]["ci_high"] == pytest.approx(res.loc["auc", "ci_high"])
    cal, pi = centre["calibration"], out.per_image
    assert cal["n"] == len(pi) and sum(b["count"] for b in cal["bins"]) == len(pi)
    brier = float(((pi["p_malignant"] - pi["malignant"]) ** 2).mean())
    assert cal["brier"] == pytest.approx(brier)
    assert paths["png"].is_file()


def test_an_ensemble_manifest_gets_a_card_with_the_members_mean_prior(tmp_path, model) -> None:
    from common.loaded_model import write_ensemble

    a = save_model(tmp_path / "a.pt", model, CFG, name="a")
    w_a = model.prior.weights()
    with torch.no_grad():
        model.prior.head.raw_weight.add_(1.0)  # another member: other prior weights
    w_b = model.prior.weights()
    b = save_model(tmp_path / "b.pt", model, replace(CFG, **{"train.seed": 5}), name="b")
    path = write_ensemble(tmp_path / "ens.yaml", [a, b], replace(CFG.inference, flip=True), "arm-ens")
    card = json.loads(card_paths(path)["json"].read_text())
    assert card_paths(path)["md"] == tmp_path / "ens.card.md"
    assert card["model"] == "arm-ens" and card["inference"]["flip"] is True
    assert "ensemble of 2 models (a.pt, b.pt)" in card["description"]
    got = {p["feature"]: p["weight"] for p in card["learned_prior"]}
    assert w_a != w_b and got == pytest.approx({k: (w_a[k] + w_b[k]) / 2 for k in w_a})
