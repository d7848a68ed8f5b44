"""benchmarks/lesion_position.py: hand-placed lesion centres, bands, and a run on tiny centres."""
import re

import numpy as np
import pandas as pd
import pytest

from benchmarks.lesion_position import by_position, lesion_centres, main, run_data
from common.config import ConfigError
from common.data import load_centre
from common.data.tensors import to_tensors


def test_lesion_centres_by_hand():
    masks = np.zeros((3, 1, 10, 20))
    masks[0, 0, 0:2, 0:4] = 1  # rows 0-1, cols 0-3: centre (2 / 20, 1 / 10)
    masks[1, 0, 5, 19] = 1  # one pixel in the last column of row 5
    got = lesion_centres(masks)
    np.testing.assert_allclose(got.loc[0], [0.1, 0.1])
    np.testing.assert_allclose(got.loc[1], [19.5 / 20, 5.5 / 10])
    assert got.loc[2].isna().all()  # no lesion, no position
    shifted = np.roll(masks[:1], 3, axis=-1)
    assert got.loc[0, "cy"] == lesion_centres(shifted).loc[0, "cy"]
    assert lesion_centres(shifted).loc[0, "cx"] == pytest.approx(0.1 + 3 / 20)


def test_by_position_bands_and_failures():
    pos = pd.DataFrame({"case_id": list("abcd"), "cx": [0.5, 0.45, 0.9, 0.05], "cy": [0.2, 0.6, 0.3, 0.9]})
    dice = pd.DataFrame({"case_id": list("abcd"), "dice": [0.8, 0.6, 0.05, 0.3]})
    t = by_position(dice, pos).set_index(["kind", "band"])
    assert t.loc[("lateral", "0-0.1"), "n"] == 2 and t.loc[("lateral", "0-0.1"), "dice"] == pytest.approx(0.7)
    assert t.loc[("lateral", "0.3-0.5"), "n"] == 2  # 0.4 and 0.45 from mid-width
    assert t.loc[("lateral", "0.3-0.5"), "failed"] == pytest.approx(0.5)
    assert t.loc[("depth", "0-0.4"), "n"] == 2 and t.loc[("depth", "0.4-1"), "dice"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="no ground-truth position"):
        by_position(pd.DataFrame({"case_id": ["zz"], "dice": [0.5]}), pos)


def test_main_on_tiny_centres(tmp_path, tiny_centres, capsys):
    root = tiny_centres
    busi = to_tensors(load_centre("BUSI", root / "BUSI", strict=False), 32)
    lesion = busi.has_lesion.numpy().astype(bool)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  image_size: 32\n  val_fraction: 0\n")
    rows = pd.DataFrame({"protocol": "paper", "arm": "consistency", "train_set": "BrEaST",
                         "case_id": list(busi.case_ids), "test_centre": "BUSI", "has_lesion": lesion,
                         "dice": np.where(lesion, 0.5, np.nan)})
    pd.concat([rows.assign(seed=8), rows.assign(seed=9)]).to_csv(run / "per_image.csv", index=False)
    assert main([str(run), "--data-root", str(root)]) == 0  # 32 px: the run's own size
    out = capsys.readouterr().out
    n_breast = int(to_tensors(load_centre("BrEaST", root / "BrEaST", strict=False), 32).has_lesion.sum())
    assert "32 px masks" in out
    assert re.search(rf"BrEaST\s+{n_breast}\s", out) and re.search(rf"BUSI\s+{int(lesion.sum())}\s", out)
    assert "trained on BrEaST), BUSI: Dice by lesion position" in out and "lateral" in out and "depth" in out
    assert main([str(run), "--arm", "multitask", "--data-root", str(root)]) == 2


def test_run_data_reads_the_runs_settings_and_cache(tmp_path):
    cfg, cache = run_data(None)
    assert (cfg.image_size, cfg.val_fraction, cache) == (128, 0.2, None)  # the paper preset
    (tmp_path / "config.yaml").write_text("data:\n  image_size: 160\n  val_fraction: 0\n")
    (tmp_path / "cache").mkdir()
    cfg, cache = run_data(tmp_path)
    assert (cfg.image_size, cfg.val_fraction, cache) == (160, 0.0, str(tmp_path / "cache"))
    assert run_data(tmp_path, None, ["data.image_size=96"])[0].image_size == 96
    assert run_data(tmp_path, "smoke")[0].image_size == 32  # an explicit preset wins over the run's
    with pytest.raises(ConfigError, match="data.image_sise"):
        run_data(tmp_path, None, ["data.image_sise=96"])


def test_main_names_a_bad_setting(tmp_path, tiny_centres, capsys):
    assert main(["--set", "data.image_size=31", "--data-root", str(tiny_centres)]) == 2
    assert "data.image_size" in capsys.readouterr().err
