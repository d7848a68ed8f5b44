"""The deployment report's "what this model learned about malignancy": prior rows read from a state
dict with ``BiradsPrior.describe()`` (server/prior_rows.py) and rendered from a hand-made
metrics.csv history (server/report_prior.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.config import ExperimentConfig, replace
from common.federation import build_experiment_model
from server.prior_rows import PriorLog, describe_rows
from server.report import RunMetrics, write_report
from server.report_prior import PRIOR_PLOT, prior_section, prior_series

HEADER = "round,phase,site,metric,value\n"
#: per round: global weights per SD for (area, margin_sharpness); site B's round-2 weights
WEIGHTS = {1: (0.5, -0.5), 2: (0.8, -0.25)}


def _prior_rows(rnd: int, site: str, w_area: float, w_margin: float) -> list[str]:
    """Rows of a two-feature prior: area (mean 0.3, SD 0.1), margin_sharpness (mean 2, SD 0.5)."""
    out = []
    for name, w, mean, std in (("area", w_area, 0.3, 0.1), ("margin_sharpness", w_margin, 2.0, 0.5)):
        out += [f"{rnd},prior,{site},weight_{name},{w}", f"{rnd},prior,{site},per_unit_{name},{w / std}",
                f"{rnd},prior,{site},mean_{name},{mean}", f"{rnd},prior,{site},std_{name},{std}"]
    return out + [f"{rnd},prior,{site},bias,0.0", f"{rnd},prior,{site},bias_per_unit,-1.0"]


def _history(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for rnd, (wa, wm) in WEIGHTS.items():
        rows += [f"{rnd},train,A,train_loss,0.5", f"{rnd},train,B,train_loss,0.6",
                 f"{rnd},evaluate,all-sites,dice,0.5", f"{rnd},train,all-sites,train_loss,0.55"]
        rows += _prior_rows(rnd, "all-sites", wa, wm)
    rows += _prior_rows(2, "A", 0.7, -0.3) + _prior_rows(2, "B", 0.9, -0.2)
    (run / "metrics.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return run


def test_section_shows_final_weights_in_clinical_units_per_round_and_per_site(tmp_path: Path) -> None:
    run = _history(tmp_path)
    text = write_report(run, total=2).read_text()
    assert "## What this model learned about malignancy" in text
    assert "after round 2" in text
    # final global prior: per SD 0.8 → per unit 0.8 / 0.1 = 8; strongest first
    assert "| area | √(lesion area / image area) | +0.800 | +8.000 | 0.3 | 0.1 | higher area raises" in text
    assert "| margin_sharpness |" in text and "| -0.250 | -0.500 | 2 | 0.5 | higher margin sharpness lowers" in text
    assert text.index("| area |") < text.index("| margin_sharpness |")
    # bias_per_unit is -1.0, the other phases' UNDEFINED sentinel: shown as a number all the same
    assert "Intercept: logit +0.000 at the mean features (φ = 0.500); -1.000 with every feature at 0." in text
    assert "| round | area | margin_sharpness |" in text
    assert "| 1 | +0.500 | -0.500 |" in text and "| 2 | +0.800 | -0.250 |" in text
    assert "| A | +0.700 | -0.300 |" in text and "| B | +0.900 | -0.200 |" in text
    png = run / PRIOR_PLOT
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({PRIOR_PLOT})" in text
    assert text.index("## What this model learned") < text.index("## Plots")


def test_series_and_no_section_without_prior_rows(tmp_path: Path) -> None:
    m = RunMetrics.read(_history(tmp_path) / "metrics.csv")
    assert prior_series(m) == [("area", [1, 2], [0.5, 0.8], False),
                               ("margin_sharpness", [1, 2], [-0.5, -0.25], False)]
    bare = RunMetrics.from_rows([["1", "train", "A", "train_loss", "0.5"]])
    assert prior_section(bare) == [] and prior_series(bare) == []
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.csv").write_text(HEADER + "1,train,A,train_loss,0.5\n")
    assert "learned about malignancy" not in write_report(run, total=1).read_text()
    assert not (run / PRIOR_PLOT).exists()


def test_a_huge_bias_renders_without_overflow() -> None:
    rows = [r.split(",") for r in _prior_rows(1, "all-sites", 0.5, -0.5)]
    rows = [[*r[:4], "-900.0"] if r[3] == "bias" else r for r in rows]
    text = "\n".join(prior_section(RunMetrics.from_rows(rows)))
    assert "logit -900.000 at the mean features (φ = 0.000)" in text


def test_prior_rows_are_describe_of_the_state() -> None:
    exp = replace(ExperimentConfig(), **{"model.arch": "small", "model.base_channels": 4, "model.depth": 2,
                                         "model.num_groups": 2})
    model = build_experiment_model(exp)
    prior = model.prior
    k = len(prior.names)
    with torch.no_grad():
        prior.running_mean.copy_(torch.arange(k, dtype=torch.float32))
        prior.running_var.fill_(4.0)  # SD 2: per unit = per SD / 2
        prior.head.bias.fill_(0.25)
    rows = PriorLog(exp).values({k: v.numpy() for k, v in model.state_dict().items()})
    first = prior.names[0]
    w = prior.weights()[first]
    assert rows[f"weight_{first}"] == pytest.approx(w, rel=1e-6)
    assert rows[f"per_unit_{first}"] == pytest.approx(w / math.sqrt(4.0 + 1e-6), rel=1e-6)
    assert rows[f"std_{first}"] == pytest.approx(2.0, rel=1e-6) and rows[f"mean_{prior.names[1]}"] == 1.0
    assert rows["bias"] == pytest.approx(0.25)
    assert rows == describe_rows(prior.describe())
    assert len(rows) == 4 * k + 2
    assert PriorLog(exp).values({"head.weight": torch.zeros(1)}) == {}  # no prior in the state
