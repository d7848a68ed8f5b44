"""BI-RADS features on predicted vs ground-truth masks (sim/feature_check.py): the per-image columns
at scoring time, the per-centre AUC table on hand-made rows, and a smoke run writing
feature_auc.csv and its report section."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sim.leave_center_out as lco
from common.data.tensors import TensorData
from common.prior import BiradsPrior
from common.records import Label
from sim.feature_check import CSV_NAME, PRED, TABLE_COLUMNS, TRUE, feature_auc_table, feature_section, \
    prior_feature_columns

S = 32
NAMES = ("area", "roughness", "compactness", "texture")


def _disc(radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    return (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) <= radius ** 2).float()[None]


def _data() -> TensorData:
    """Four images: benign lesion, malignant lesion, normal, and a malignant label-only image."""
    masks = torch.stack([_disc(5), _disc(9), torch.zeros(1, S, S), torch.zeros(1, S, S)])
    labels = torch.tensor([Label.BENIGN, Label.MALIGNANT, Label.NORMAL, Label.MALIGNANT])
    images = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.6 * masks
    return TensorData(images=images, masks=masks, malignant=(labels == Label.MALIGNANT).float(), labels=labels,
                      has_lesion=torch.tensor([True, True, False, True]), spacing_mm=torch.full((4,), float("nan")),
                      case_ids=list("abcd"), centres=["X"] * 4,
                      has_mask=torch.tensor([True, True, True, False]))


def test_columns_only_for_lesions_with_mask_and_label() -> None:
    data = _data()
    prior = BiradsPrior(NAMES)
    probs = data.masks.numpy().copy()  # a perfect prediction: the same features on both sides
    cols = prior_feature_columns(prior, data, probs)
    assert len(cols) == 4
    assert cols.iloc[[0, 1]].notna().all().all() and cols.iloc[[2, 3]].isna().all().all()
    np.testing.assert_allclose(cols[[f"{PRED}{f}" for f in NAMES]].to_numpy(),
                               cols[[f"{TRUE}{f}" for f in NAMES]].to_numpy(), rtol=1e-6)
    # the larger disc has the larger area feature (√ of the area fraction ≈ r·√π / S)
    assert cols[f"{TRUE}area"].iloc[1] > cols[f"{TRUE}area"].iloc[0]
    assert cols[f"{TRUE}area"].iloc[1] == pytest.approx(9 * np.sqrt(np.pi) / S, rel=0.1)
    # untrained prior (weights 0.5 in the clinical direction, bias 0): φ is φ with equal weights
    np.testing.assert_allclose(cols["phi_true"].iloc[:2], cols["phi0_true"].iloc[:2], rtol=1e-6)
    assert ((cols["phi_true"].iloc[:2] > 0) & (cols["phi_true"].iloc[:2] < 1)).all()
    assert prior.training  # the caller's prior is left as it was (a copy is evaluated)


def _per_image(seed: int, centre: str, mal_area: list[float], ben_area: list[float]) -> pd.DataFrame:
    n_m, n_b = len(mal_area), len(ben_area)
    area = np.array(mal_area + ben_area)
    return pd.DataFrame({
        "protocol": "paper", "arm": "consistency", "train_set": "A", "test_centre": centre, "seed": seed,
        "malignant": [1.0] * n_m + [0.0] * n_b,
        f"{TRUE}area": area, f"{PRED}area": -area,  # reversed order on the predicted masks
        f"{TRUE}margin_sharpness": area, f"{PRED}margin_sharpness": area,  # clinical sign −1
        "phi_true": area, "phi_pred": np.full(n_m + n_b, 0.5),  # ties: AUC 0.5
        "phi0_true": area, "phi0_pred": area,
    })


def test_auc_table_by_hand(tmp_path: Path) -> None:
    per_image = pd.concat([
        _per_image(0, "B", [0.9, 0.8], [0.1, 0.2, 0.3]),
        _per_image(1, "B", [0.9, 0.8], [0.1, 0.2, 0.3]),
        _per_image(0, "C", [0.9, 0.8], []),  # one class only: AUC undefined, no rows
        pd.DataFrame({"protocol": ["paper"], "arm": ["consistency"], "train_set": ["A"], "test_centre": ["B"],
                      "seed": [0], "malignant": [1.0]}),  # a normal image: NaN features, left out
    ], ignore_index=True)
    table = feature_auc_table(per_image)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert set(table["test_centre"]) == {"B"} and len(table) == 2 * 4
    row = table[(table["seed"] == 0)].set_index("feature")
    assert row.loc["area", "auc_true_mask"] == 1.0 and row.loc["area", "auc_pred_mask"] == 0.0
    assert row.loc["margin_sharpness", "auc_true_mask"] == 0.0  # larger = sharper = benign-looking
    assert row.loc["phi (learned)", "auc_pred_mask"] == 0.5 and row.loc["phi (learned)", "auc_true_mask"] == 1.0
    assert (row["n_lesions"] == 5).all() and (row["n_malignant"] == 2).all()
    lines = feature_section(table, {"paper": "train on one centre"})
    text = "\n".join(lines)
    assert "#### Tested on B" in text and "#### Tested on C" not in text
    assert "| train on one centre | consistency | A | 5 (2) | 0.00 / 1.00 |" in text
    assert "φ (learned)" in text and CSV_NAME in text
    assert feature_section(feature_auc_table(per_image.drop(columns=[c for c in per_image if "_" in c
                                                                      and c.startswith(("feat", "phi"))]))) == []


def test_smoke_run_writes_feature_auc_and_report_section(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert lco.main(["--preset", "smoke", "--no-progress", "--protocols", "paper", "--set", "sim.arms=consistency",
                     "--out", str(out)]) == 0
    (folder,) = sorted(out.glob("lco-*"))
    per_image = pd.read_csv(folder / "per_image.csv")
    lesion = per_image["has_lesion"].astype(bool) & (per_image["label"] != int(Label.NORMAL))
    assert per_image.loc[lesion, [c for c in per_image if c.startswith(TRUE)]].notna().all().all()
    assert per_image.loc[~lesion, "phi_pred"].isna().all()
    table = pd.read_csv(folder / CSV_NAME)
    assert list(table.columns) == list(TABLE_COLUMNS)
    centres = set(per_image["test_centre"])
    assert set(table["test_centre"]) <= centres and len(table) > 0
    assert table[["auc_true_mask", "auc_pred_mask"]].apply(lambda c: c.between(0, 1)).all().all()
    report = (folder / "report.md").read_text()
    assert "## BI-RADS features on predicted vs ground-truth masks" in report
    for centre in set(table["test_centre"]):
        assert report.count(f"#### Tested on {centre}") == 2  # protocol 1's table and this one
