"""The temperature on the one prediction path: ``build_predictor`` divides each member's
malignancy logit by its T (masks untouched), the model file carries it (older files load as 1,
invalid ones are refused), ``set_temperature`` keeps weights and the card's evaluation, and the
predict graph and its ONNX export apply it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.config import InferenceConfig, replace
from common.federation import build_experiment_model
from common.inference import Predictor, build_predictor
from common.loaded_model import load_model, write_ensemble
from common.modelcard import card_paths, centre_evaluation
from common.modelfile import (
    ModelFileError,
    _write,
    read_model,
    save_model,
    set_temperature,
    write_card_for,
)
from common.settings import load_settings
from tests.common.test_inference import Constant, tiny, x_batch

CFG = load_settings("smoke").experiment


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_experiment_model(CFG).eval()


def test_one_member_without_views_divides_its_logit_by_t() -> None:
    net, x = tiny(), x_batch()
    with torch.no_grad():
        m1, c1 = build_predictor([net], InferenceConfig())(x)
        m2, c2 = build_predictor([net], InferenceConfig(), temperatures=[2.5])(x)
    assert torch.equal(m1, m2)
    torch.testing.assert_close(c2, c1 / 2.5)


def test_with_views_the_members_view_mean_is_calibrated() -> None:
    net, x = tiny(), x_batch()
    cfg = InferenceConfig(flip=True, depth_shifts=(0.25,))
    with torch.no_grad():
        m1, c1 = build_predictor([net], cfg)(x)
        m2, c2 = build_predictor([net], cfg, temperatures=[0.5])(x)
    torch.testing.assert_close(m2, m1)
    torch.testing.assert_close(c2, c1 / 0.5, atol=1e-4, rtol=1e-4)


def test_an_ensemble_averages_its_calibrated_members_by_hand() -> None:
    # member probabilities 0.75 (T 1 → 0.75) and 27/28 (logit 3 log 3, T 3 → 0.75): mean 0.75
    with torch.no_grad():
        _, cls = build_predictor([Constant(0.75), Constant(27 / 28)], InferenceConfig(),
                                 temperatures=[1.0, 3.0])(torch.zeros(2, 1, 4, 4))
    torch.testing.assert_close(torch.sigmoid(cls), torch.full((2,), 0.75), atol=1e-5, rtol=0)


def test_temperatures_are_checked() -> None:
    for bad in ([0.0], [-1.0], [math.nan], [1.0, 2.0]):
        with pytest.raises(ValueError):
            Predictor([Constant(0.5)], temperatures=bad)


def test_the_model_file_carries_t_and_an_older_file_loads_as_1(tmp_path, model) -> None:
    path = save_model(tmp_path / "m.pt", model, CFG, name="m", temperature=1.7,
                      calibration={"temperature": 1.7, "split": "validation", "centres": {"A": 30}, "n": 30,
                                   "fitted": True, "nll_before": 0.6, "nll_after": 0.5})
    loaded = load_model(path)
    assert loaded.temperatures == [1.7] and loaded.describe()["temperatures"] == [1.7]
    card = json.loads(card_paths(path)["json"].read_text())
    assert card["calibration"]["temperature"] == 1.7
    md = card_paths(path)["md"].read_text()
    assert "T = 1.7" in md and "validation split" in md and "A (30)" in md
    state, meta = read_model(path)
    old = {k: v for k, v in meta.items() if k not in ("temperature", "calibration")}
    _write(tmp_path / "old.pt", state, old)  # as written before calibration existed
    assert load_model(tmp_path / "old.pt").temperatures == [1.0]
    _write(tmp_path / "bad.pt", state, {**meta, "temperature": -2.0})
    with pytest.raises(ModelFileError, match="bad.pt: temperature"):
        load_model(tmp_path / "bad.pt")


def test_set_temperature_keeps_the_weights_and_the_cards_evaluation(tmp_path, model) -> None:
    path = save_model(tmp_path / "m.pt", model, CFG, name="m")
    assert load_model(path).temperatures == [1.0]
    write_card_for(path, [centre_evaluation("A (validation)", [{"metric": "dice", "value": 0.6, "n": 5}])],
                   "after round 2")
    before, _ = read_model(path)
    set_temperature(path, 2.0, {"temperature": 2.0, "split": "validation", "centres": {"A": 9, "B": 12},
                                "n": 21, "fitted": True, "federated": True})
    after, meta = read_model(path)
    assert meta["temperature"] == 2.0 and all(torch.equal(before[k], after[k]) for k in before)
    card = json.loads(card_paths(path)["json"].read_text())
    assert card["evaluation"]["note"] == "after round 2"
    assert card["evaluation"]["centres"][0]["metrics"]["dice"]["value"] == 0.6
    assert "no image left its site" in card["calibration"]["text"]


def test_the_sim_card_shows_ece_before_and_after() -> None:
    y = [1, 0, 1, 0]
    ev = centre_evaluation("B", [], y, [0.6, 0.4, 0.6, 0.4], p_uncalibrated=[0.99, 0.01, 0.99, 0.01])
    assert ev["calibration"]["brier_raw"] == pytest.approx(0.0001)
    assert ev["calibration"]["brier"] == pytest.approx(0.16)
    assert ev["calibration"]["ece_raw"] == pytest.approx(0.01) and ev["calibration"]["ece"] == pytest.approx(0.4)
    from common.modelcard import build_card, render_markdown

    md = render_markdown(build_card({"name": "m"}, [ev]))
    assert "ECE, 10 bins (T = 1 → T)" in md and "0.010 → 0.400" in md


def test_the_predict_graph_and_its_onnx_export_apply_t(tmp_path, model) -> None:
    from common.predictgraph import build_graph

    one = save_model(tmp_path / "one.pt", model, CFG, name="one")
    two = save_model(tmp_path / "two.pt", model, CFG, name="two", temperature=2.0)
    raw = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = build_graph(load_model(one))(raw), build_graph(load_model(two))(raw)
    torch.testing.assert_close(b[0], a[0])  # masks
    torch.testing.assert_close(torch.logit(b[1].double()), torch.logit(a[1].double()) / 2, atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from common.predictgraph import export_onnx
    from common.prediction import OnnxBackend

    views = replace(CFG.inference, flip=True)
    ens = write_ensemble(tmp_path / "ens.yaml", [one, two], views)
    assert export_onnx(load_model(two), tmp_path / "two.onnx") <= 1e-4
    assert export_onnx(load_model(ens), tmp_path / "ens.onnx") <= 1e-4
    got = OnnxBackend(tmp_path / "two.onnx").run(raw.numpy())
    np.testing.assert_allclose(got[1], b[1].numpy(), atol=1e-4)
