"""sim/score_model.py: a model file scored on a public centre's layout with the simulation's
scoring (the rows a unit writes), and a centre that is not there named in the error."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from common.config import ExperimentConfig, replace
from common.federation import build_experiment_model
from common.modelfile import save_model
from sim.score_model import main
from tests.common.test_data_readers import make_busi


@pytest.fixture(autouse=True)
def _tiny_images_allowed(monkeypatch) -> None:
    monkeypatch.setattr("common.data.plausibility.MIN_SIDE", 1)


def test_a_model_file_is_scored_on_a_centre_like_a_unit(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    make_busi(root / "BUSI")
    cfg = replace(ExperimentConfig(), **{"data.image_size": 32, "model.base_channels": 4, "model.depth": 2})
    torch.manual_seed(0)
    model_path = save_model(tmp_path / "m.pt", build_experiment_model(cfg), cfg, name="tiny")
    out = tmp_path / "scores.csv"
    assert main([str(model_path), "--data-root", str(root), "--centres", "BUSI", "--bootstrap", "20",
                 "--out", str(out)]) == 0
    rows = pd.read_csv(out).set_index("metric")
    assert set(rows["test_centre"]) == {"BUSI"} and set(rows["model"]) == {"tiny"}
    assert rows.loc["dice", "n"] == 3 and 0.0 <= rows.loc["dice", "value"] <= 1.0  # the lesion images
    assert rows.loc["auc", "n"] == 5  # malignant vs the rest, over every image
    assert "BUSI: Dice" in capsys.readouterr().out
    assert main([str(model_path), "--data-root", str(root), "--centres", "UDIAT"]) == 2
    assert "UDIAT" in capsys.readouterr().err
    # --own-split: only the images a federation with sim.test_on own_split held back and tests on
    assert main([str(model_path), "--data-root", str(root), "--centres", "BUSI", "--bootstrap", "20",
                 "--own-split", "0.4", "--out", str(out)]) == 0
    assert 0 < pd.read_csv(out).set_index("metric").loc["auc", "n"] < 5
    for bad, says in (("1.5", "data.test_fraction: must lie in"), ("0", "holds back no test split")):
        assert main([str(model_path), "--data-root", str(root), "--centres", "BUSI", "--own-split", bad]) == 2
        assert says in capsys.readouterr().err
