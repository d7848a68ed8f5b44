"""benchmarks/lesion_position.py: hand-placed lesion centres, bands, and a run on tiny centres."""
import re

import numpy as np
import pandas as pd
import pytest

from benchmarks.external_validation import load_external
from benchmarks.lesion_position import by_position, lesion_centres, main
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
    root, _ = tiny_centres
    busi = load_external("BUSI", root / "BUSI", 16, None)
    lesion = busi.has_lesion.numpy().astype(bool)
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"case_id": list(busi.case_ids), "eval_centre": "BUSI", "inference": "raw",
                  "has_lesion": lesion, "dice": np.where(lesion, 0.5, np.nan)}).to_csv(run / "per_image.csv")
    assert main([str(run), "--size", "16", "--data-root", str(root), "--cache-dir", ""]) == 0
    out = capsys.readouterr().out
    n_breast = int(to_tensors(load_centre("BrEaST", root / "BrEaST", strict=False), 16).has_lesion.sum())
    assert re.search(rf"BrEaST\s+{n_breast}\s", out) and re.search(rf"BUSI\s+{int(lesion.sum())}\s", out)
    assert "BUSI: Dice by lesion position" in out and "lateral" in out and "depth" in out
    assert main([str(run), "--inference", "flip+shift", "--size", "16", "--data-root", str(root),
                 "--cache-dir", ""]) == 2


def test_run_size_from_a_run_or_an_ensemble_folder(tmp_path):
    from benchmarks.lesion_position import _run_size

    member = tmp_path / "m"
    member.mkdir()
    (member / "config.yaml").write_text("args:\n  size: 160\n")
    ens = tmp_path / "e"
    ens.mkdir()
    (ens / "members.txt").write_text(f"{member}\n{tmp_path / 'other'}\n")
    assert _run_size(member) == 160 and _run_size(ens) == 160
    assert _run_size(tmp_path) is None
