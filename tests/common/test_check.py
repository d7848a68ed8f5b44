"""Site check report on tiny sites: counts, sizes, mask problems, duplicates, every issue."""
from __future__ import annotations

import numpy as np
import pytest

from common.data.check import check_site
from common.records import DataError
from tests.common.test_data_readers import H, W, blob, img, make_busi, make_manifest, png


def test_clean_site_report(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    png(base / "malignant" / "malignant (2).png", img(2))      # = benign (2): cross-label
    png(base / "malignant" / "malignant (2)_mask.png", blob())
    png(base / "normal" / "normal (3).png", img(40, H + 2, W - 1))
    rep = check_site(tmp_path)
    assert rep.fmt == "BUSI" and rep.ok
    assert rep.per_class == {"benign": 1, "malignant": 1, "normal": 3}
    assert rep.heights == (H, H + 2) and rep.widths == (W - 1, W)
    assert rep.masks["with lesion"] == 2 and rep.masks["empty (normal)"] == 3
    assert rep.cross_label_groups == 1 and rep.duplicate_groups == 0
    text = rep.format()
    assert "cases: 5" in text and "benign 1" in text and "result: OK" in text
    assert "malignant (2).png" in text


def test_report_counts_mask_problems_and_fails_on_errors(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    png(base / "benign" / "benign (2)_mask.png", blob(1, 1, 2 * H, 2 * W))      # resized
    png(base / "malignant" / "malignant (3).png", img(50))                      # no mask
    soft = blob().astype(np.uint8) * 200
    soft[0, 0] = 50
    png(base / "malignant" / "malignant (1)_mask.png", soft)                    # non-binary
    png(base / "normal" / "normal (4).png", img(4))                            # = normal (1)
    rep = check_site(tmp_path, fmt="busi")
    assert not rep.ok
    assert (rep.masks["missing"], rep.masks["mismatched"], rep.masks["non-binary"]) == (1, 1, 1)
    assert rep.duplicate_groups == 1 and rep.duplicate_images == 2
    text = rep.format()
    assert "FAILED: 1 error(s)" in text and "malignant (3).png" in text
    assert "benign (2)_mask.png" in text and "normal (4).png" in text


def test_manifest_site_and_spacing(tmp_path):
    rep = check_site(make_manifest(tmp_path), fmt="manifest")
    assert rep.ok and rep.spacing_known == 1 and rep.per_class["malignant"] == 1


def test_empty_site_is_not_ok(tmp_path):
    for name in ("benign", "malignant", "normal"):
        (tmp_path / name).mkdir()
    rep = check_site(tmp_path)
    assert not rep.ok and rep.n_cases == 0 and "FAILED" in rep.format()


def test_unrecognised_layout_and_format(tmp_path):
    with pytest.raises(DataError, match="cannot recognise"):
        check_site(tmp_path)
    with pytest.raises(ValueError, match="unknown data format"):
        check_site(tmp_path, fmt="dicom")


@pytest.mark.integration
def test_real_busi_report(data_root):
    if not (data_root / "BUSI").is_dir():
        pytest.skip("BUSI not present")
    rep = check_site(data_root / "BUSI")
    assert rep.ok and rep.n_cases == 778 and rep.cross_label_groups == 1
