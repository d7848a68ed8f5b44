"""Centre readers on tiny fixtures built in tmp_path (every malformed input), plus the real data."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data import (CENTRES, breast, busi, busuclm, detect_format, discover_centres,
                         load_centre, load_format, load_site, manifest, udiat)
from common.data.io import read_mask
from common.records import DataError, Label

H, W = 8, 10


@pytest.fixture(autouse=True)
def _tiny_images_allowed(monkeypatch) -> None:
    """These fixtures are 10x8 px; the under-32-px warning is tested in test_bad_data.py."""
    monkeypatch.setattr("common.data.plausibility.MIN_SIDE", 1)


def img(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def blob(r0: int = 2, c0: int = 3, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0:r0 + 3, c0:c0 + 3] = True
    return m


def png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
    Image.fromarray(a).save(path)
    return path


def kinds(result, level: str | None = None) -> Counter:
    return Counter(i.kind for i in result.issues if level is None or i.level == level)


# --- builders (also used by the site-check tests) ----------------------------------------------

def make_busi(root: Path) -> Path:
    """benign (1) two masks, benign (2), malignant (1), normal (1) black mask, normal (2) none."""
    base = root / "Dataset_BUSI_with_GT"
    png(base / "benign" / "benign (1).png", img(1))
    png(base / "benign" / "benign (1)_mask.png", blob(0, 0))
    png(base / "benign" / "benign (1)_mask_1.png", blob(5, 7))
    png(base / "benign" / "benign (2).png", img(2))
    Image.fromarray(blob()).save(base / "benign" / "benign (2)_mask.png")  # mode '1'
    png(base / "malignant" / "malignant (1).png", np.repeat(img(3)[..., None], 3, axis=2))
    png(base / "malignant" / "malignant (1)_mask.png", blob())
    png(base / "normal" / "normal (1).png", img(4))
    png(base / "normal" / "normal (1)_mask.png", np.zeros((H, W, 3), np.uint8))
    png(base / "normal" / "normal (2).png", img(5))
    return root


def make_uclm(root: Path) -> Path:
    green, red = np.zeros((H, W, 3), np.uint8), np.zeros((H, W, 3), np.uint8)
    green[blob()] = (0, 255, 0)
    red[blob()] = (255, 0, 0)
    for name, arr, mask in [("ALWI_000", img(1), green), ("ALWI_001", img(2), None),
                            ("BOPE_000", img(3), red), ("BOPE_001", img(4), np.zeros_like(red))]:
        png(root / "images" / f"{name}.png", arr)
        if mask is not None:
            png(root / "masks" / f"{name}.png", mask)
    (root / "INFO.csv").write_bytes(
        "\ufeffImage;Resolution;Label;Doppler;Marks;Combined\n"
        "ALWI_000.png;10x8;Benign;No;Yes;No\nALWI_001.png;10x8;Normal;No;No;No\n"
        "BOPE_000.png;10x8;Malignant;Y;No;No\nBOPE_001.png;10x8;Normal;No;No;No\n".encode())
    return root


def make_breast(root: Path, rows: list[dict] | None = None) -> Path:
    d = root / breast.IMAGES_DIR
    png(d / "case001.png", np.dstack([img(1)] * 3 + [np.zeros((H, W), np.uint8)]))  # RGBA
    png(d / "case001_tumor.png", blob())
    png(d / "case001_other1.png", blob(0, 0))
    png(d / "case002.png", img(2))
    png(d / "case002_tumor.png", blob(4, 4))
    png(d / "case003.png", img(3))
    rows = rows if rows is not None else [
        {"CaseID": 1, "Image_filename": "case001.png", "Mask_tumor_filename": "case001_tumor.png",
         "Mask_other_filename": "case001_other1.png", "Pixel_size": 0.0078125, "Age": 57,
         "Shape": "oval", "Margin": "not circumscribed - angular&indistinct", "BIRADS": 3,
         "Classification": "benign"},
        {"CaseID": 2, "Image_filename": "case002.png", "Mask_tumor_filename": "case002_tumor.png",
         "Mask_other_filename": None, "Pixel_size": 0.005, "Age": "not available",
         "Shape": "irregular", "Margin": "circumscribed", "BIRADS": "4c",
         "Classification": "malignant"},
        {"CaseID": 3, "Image_filename": "case003.png", "Mask_tumor_filename": None,
         "Mask_other_filename": None, "Pixel_size": 0.006, "Age": 40, "Shape": "not applicable",
         "Margin": "not applicable", "BIRADS": 1, "Classification": "normal"}]
    pd.DataFrame(rows).to_excel(root / "BrEaST-Lesions-USG-clinical-data-Dec-15-2023.xlsx",
                                index=False)
    return root


def make_udiat(root: Path, columns: dict | None = None) -> Path:
    for k in (1, 2):
        png(root / "original" / f"{k:06d}.png", img(k))
        png(root / "GT" / f"{k:06d}.png", blob(k, k))
    columns = columns if columns is not None else {
        "Image": [1, 2], "Type": [" benign ", "MALIGNANT"], "Histology": ["CYST", "IDC"]}
    pd.DataFrame(columns).to_excel(root / "DatasetB.xlsx", index=False)
    return root


def make_manifest(root: Path, text: str | None = None) -> Path:
    png(root / "imgs" / "a.png", img(1))
    png(root / "masks" / "a1.png", blob(0, 0))
    png(root / "masks" / "a2.png", blob(5, 7))
    png(root / "imgs" / "b.png", img(2))
    (root / "manifest.csv").write_text(text if text is not None else (
        "image,mask,label,patient_id,spacing_mm,view\n"
        "imgs/a.png,masks/a1.png|masks/a2.png,Malignant,P1,0.1,radial\n"
        "imgs/b.png,,normal,,,\n"))
    return root


# --- BUSI ------------------------------------------------------------------------------------

def test_busi_happy_path_merges_masks(tmp_path):
    res = busi.load(make_busi(tmp_path))
    assert res.issues == []
    by_id = {c.case_id: c for c in res.cases}
    assert Counter(c.label for c in res.cases) == {Label.BENIGN: 2, Label.MALIGNANT: 1,
                                                  Label.NORMAL: 2}
    np.testing.assert_array_equal(by_id["benign (1)"].mask, blob(0, 0) | blob(5, 7))
    assert not by_id["normal (2)"].has_lesion and not by_id["normal (1)"].has_lesion
    assert by_id["malignant (1)"].image.ndim == 2 and by_id["benign (2)"].patient_id == "benign (2)"
    assert all(c.centre == "BUSI" for c in res.cases)


def test_busi_accepts_inner_folder_as_root(tmp_path):
    make_busi(tmp_path)
    assert len(busi.load(tmp_path / "Dataset_BUSI_with_GT").cases) == 5


def test_busi_cross_label_duplicate_dropped_and_named(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    png(base / "malignant" / "malignant (2).png", img(2))  # same pixels as benign (2)
    png(base / "malignant" / "malignant (2)_mask.png", blob())
    res = busi.load(tmp_path)
    ids = {c.case_id for c in res.cases}
    assert "benign (2)" not in ids and "malignant (2)" not in ids and len(ids) == 4
    (issue,) = [i for i in res.issues if i.kind == "duplicate-conflict"]
    assert issue.level == "warning"
    assert "benign (2).png" in issue.message and "malignant (2).png" in issue.message


def test_busi_same_label_duplicate_kept_with_shared_patient(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    png(base / "benign" / "benign (3).png", img(2))
    png(base / "benign" / "benign (3)_mask.png", blob())
    res = busi.load(tmp_path)
    by_id = {c.case_id: c for c in res.cases}
    assert by_id["benign (3)"].patient_id == by_id["benign (2)"].patient_id == "benign (2)"
    assert kinds(res) == {"duplicate": 1}


def test_busi_malformed_inputs_each_reported_and_strict_lists_all(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    (base / "benign" / "benign (7).png").write_bytes(b"junk")                     # unreadable
    full = png(tmp_path / "x.png", img(9, 32, 32)).read_bytes()
    (base / "benign" / "benign (8).png").write_bytes(full[:120])                  # truncated
    png(base / "benign" / "benign (8)_mask.png", blob())
    png(base / "malignant" / "malignant (3).png", img(10))                       # no mask
    png(base / "malignant" / "malignant (9)_mask.png", blob())                   # no image
    png(base / "normal" / "normal (3).png", img(11))
    png(base / "normal" / "normal (3)_mask.png", blob())                         # normal, lesion
    (base / "benign" / "notes.txt").write_text("hello")                          # stray file
    res = busi.load(tmp_path, strict=False)
    errors = {Path(i.path).name: i.kind for i in res.errors}
    assert errors == {"benign (7).png": "unreadable", "benign (8).png": "unreadable",
                      "malignant (3).png": "mask-missing", "normal (3)_mask.png": "label"}
    warns = {Path(i.path).name: i.kind for i in res.warnings}
    assert warns == {"malignant (9)_mask.png": "orphan", "notes.txt": "stray"}
    assert len(res.cases) == 5
    with pytest.raises(DataError) as info:
        busi.load(tmp_path)
    text = str(info.value)
    assert "4 error(s)" in text
    for name in errors:
        assert name in text


def test_busi_mask_size_and_levels(tmp_path):
    make_busi(tmp_path)
    base = tmp_path / "Dataset_BUSI_with_GT"
    png(base / "benign" / "benign (2)_mask.png", blob(1, 1, 2 * H, 2 * W))       # 2x: resized
    soft = blob().astype(np.uint8) * 200
    soft[0, 0] = 90                                                               # grey level
    png(base / "malignant" / "malignant (1)_mask.png", soft)
    png(base / "benign" / "benign (5).png", img(20))
    png(base / "benign" / "benign (5)_mask.png", blob(h=H + 3))                   # other aspect
    res = busi.load(tmp_path, strict=False)
    assert kinds(res, "warning") == {"mask-size": 1, "mask-nonbinary": 1}
    assert [(Path(i.path).name, i.kind) for i in res.errors] == [("benign (5)_mask.png",
                                                                   "mask-size")]
    by_id = {c.case_id: c for c in res.cases}
    assert by_id["benign (2)"].mask.shape == (H, W)
    np.testing.assert_array_equal(by_id["malignant (1)"].mask, blob())


def test_busi_empty_folder_is_an_error(tmp_path):
    for name in ("benign", "malignant", "normal"):
        (tmp_path / name).mkdir()
    res = busi.load(tmp_path, strict=False)
    assert res.cases == [] and kinds(res, "error") == {"layout": 1}
    with pytest.raises(DataError, match="no usable images"):
        busi.load(tmp_path)


# --- BUS-UCLM --------------------------------------------------------------------------------

def test_uclm_happy_path(tmp_path):
    res = busuclm.load(make_uclm(tmp_path))
    assert res.issues == []
    by_id = {c.case_id: c for c in res.cases}
    assert by_id["ALWI_000"].label == Label.BENIGN and by_id["BOPE_000"].label == Label.MALIGNANT
    assert by_id["ALWI_001"].label == Label.NORMAL and not by_id["ALWI_001"].has_lesion
    np.testing.assert_array_equal(by_id["BOPE_000"].mask, blob())
    assert by_id["BOPE_001"].patient_id == "BOPE"
    assert by_id["BOPE_000"].descriptors["Doppler"] == "Y"


def test_uclm_colour_disagreeing_with_info_is_an_error(tmp_path):
    make_uclm(tmp_path)
    red = np.zeros((H, W, 3), np.uint8)
    red[blob()] = (255, 0, 0)
    png(tmp_path / "masks" / "ALWI_000.png", red)  # INFO says Benign
    res = busuclm.load(tmp_path, strict=False)
    (err,) = res.errors
    assert err.kind == "label" and "ALWI_000.png" in err.path and "malignant" in err.message


def test_uclm_missing_label_column_names_info(tmp_path):
    make_uclm(tmp_path)
    (tmp_path / "INFO.csv").write_text("Image;Diagnosis\nALWI_000.png;Benign\n")
    with pytest.raises(DataError, match=r"INFO\.csv.*Label"):
        busuclm.load(tmp_path)


def test_uclm_unlisted_image_and_unknown_label(tmp_path):
    make_uclm(tmp_path)
    png(tmp_path / "images" / "ZZZZ_000.png", img(30))
    text = (tmp_path / "INFO.csv").read_text(encoding="utf-8-sig").replace(
        "BOPE_001.png;10x8;Normal", "BOPE_001.png;10x8;Suspicious")
    (tmp_path / "INFO.csv").write_text(text, encoding="utf-8-sig")
    res = busuclm.load(tmp_path, strict=False)
    msgs = {Path(i.path).name: i.message for i in res.errors}
    assert "label missing" in msgs["ZZZZ_000.png"]
    assert "row 5" in msgs["INFO.csv"] and "Suspicious" in msgs["INFO.csv"]
    assert len(res.cases) == 3


# --- BrEaST ----------------------------------------------------------------------------------

def test_breast_happy_path_other_findings_not_merged(tmp_path):
    res = breast.load(make_breast(tmp_path))
    assert res.issues == []
    by_id = {c.case_id: c for c in res.cases}
    np.testing.assert_array_equal(by_id["case001"].mask, blob())  # not | blob(0, 0)
    assert by_id["case001"].descriptors["Other_findings"] == "1"
    assert by_id["case001"].descriptors["Margin"] == "not circumscribed - angular&indistinct"
    assert by_id["case001"].descriptors["BIRADS"] == "3"
    assert by_id["case002"].descriptors["Age"] == "not available"
    assert by_id["case003"].label == Label.NORMAL and not by_id["case003"].has_lesion
    assert "Classification" not in by_id["case001"].descriptors
    assert all(c.spacing_mm is None for c in res.cases)


def test_breast_spacing_only_for_original_resolution(tmp_path):
    res = breast.load(make_breast(tmp_path), original_resolution=True)
    by_id = {c.case_id: c for c in res.cases}
    assert by_id["case001"].spacing_mm == pytest.approx(0.078125)  # cm → mm


def test_breast_bad_labels_name_sheet_row(tmp_path):
    make_breast(tmp_path)
    rows = pd.read_excel(next(tmp_path.glob("*.xlsx")))
    rows.loc[1, "Classification"] = "maybe"
    rows.loc[2, "Classification"] = None
    rows.to_excel(next(tmp_path.glob("*.xlsx")), index=False)
    res = breast.load(tmp_path, strict=False)
    msgs = sorted(i.message for i in res.errors)
    assert len(msgs) == 2 and "row 3" in msgs[0] and "maybe" in msgs[0] and "row 4" in msgs[1]


def test_breast_missing_column_and_missing_sheet(tmp_path):
    make_breast(tmp_path)
    sheet = next(tmp_path.glob("*.xlsx"))
    pd.read_excel(sheet).drop(columns="Classification").to_excel(sheet, index=False)
    with pytest.raises(DataError, match="clinical-data.*Classification"):
        breast.load(tmp_path)
    sheet.unlink()
    with pytest.raises(DataError, match="no clinical spreadsheet"):
        breast.load(tmp_path)


def test_breast_image_without_row_and_missing_tumour_mask(tmp_path):
    make_breast(tmp_path)
    d = tmp_path / breast.IMAGES_DIR
    png(d / "case004.png", img(4))
    (d / "case002_tumor.png").unlink()
    res = breast.load(tmp_path, strict=False)
    errs = {Path(i.path).name: i.kind for i in res.errors}
    assert errs == {"case004.png": "label", "case002_tumor.png": "unreadable"}


# --- UDIAT -----------------------------------------------------------------------------------

def test_udiat_happy_path(tmp_path):
    res = udiat.load(make_udiat(tmp_path))
    assert res.issues == []
    by_id = {c.case_id: c for c in res.cases}
    assert by_id["000001"].label == Label.BENIGN and by_id["000002"].label == Label.MALIGNANT
    assert by_id["000002"].descriptors == {"Histology": "IDC"}
    np.testing.assert_array_equal(by_id["000001"].mask, blob(1, 1))


def test_udiat_tolerates_column_spelling(tmp_path):
    res = udiat.load(make_udiat(tmp_path, {"Image name": ["000001.png", "2"],
                                           "TYPE": ["Benign", "Malignant"]}))
    assert len(res.cases) == 2 and res.issues == []


def test_udiat_missing_type_column_names_the_sheet(tmp_path):
    make_udiat(tmp_path, {"Image": [1, 2], "Class": ["Benign", "Malignant"]})
    with pytest.raises(DataError, match=r"DatasetB\.xlsx.*'Type' missing"):
        udiat.load(tmp_path)


def test_udiat_image_without_gt_and_gt_without_image(tmp_path):
    make_udiat(tmp_path)
    (tmp_path / "GT" / "000002.png").unlink()
    png(tmp_path / "GT" / "000003.png", blob())
    res = udiat.load(tmp_path, strict=False)
    assert [(Path(i.path).name, i.kind) for i in res.errors] == [("000002.png", "mask-missing")]
    assert [(Path(i.path).name, i.kind) for i in res.warnings] == [("000003.png", "orphan")]


# --- manifest --------------------------------------------------------------------------------

def test_manifest_happy_path(tmp_path):
    res = manifest.load(make_manifest(tmp_path))
    assert res.issues == []
    a, b = res.cases
    np.testing.assert_array_equal(a.mask, blob(0, 0) | blob(5, 7))
    assert (a.case_id, a.patient_id, a.spacing_mm, a.label) == ("imgs/a", "P1", 0.1,
                                                                Label.MALIGNANT)
    assert a.descriptors == {"view": "radial"} and a.centre == tmp_path.name
    assert (b.patient_id, b.spacing_mm, b.has_lesion) == ("imgs/b", None, False)


def test_manifest_row_errors_name_file_and_row(tmp_path):
    make_manifest(tmp_path, "image,mask,label,spacing_mm\n"
                            "imgs/a.png,masks/a1.png,malignant,-1\n"
                            "imgs/b.png,,unsure,\n"
                            "imgs/c.png,,normal,\n"
                            "imgs/a.png,masks/a1.png,malignant,\n"
                            "imgs/b.png,,benign,\n")
    res = manifest.load(tmp_path, strict=False)
    got = sorted((Path(i.path).name, i.message.split(":")[0]) for i in res.errors)
    assert got == [("a.png", "manifest.csv row 2"), ("b.png", "manifest.csv row 3"),
                   ("c.png", "file not found"), ("manifest.csv", "row 5"),
                   ("manifest.csv", "row 6")]


def test_manifest_partial_annotations(tmp_path):
    make_manifest(tmp_path, "image,mask,label\n"
                            "imgs/a.png,masks/a1.png,\n"  # mask only
                            "imgs/b.png,,benign\n")  # label only
    png(tmp_path / "imgs" / "c.png", img(3))
    png(tmp_path / "masks" / "empty.png", np.zeros((H, W), bool))
    with open(tmp_path / "manifest.csv", "a") as fh:
        fh.write("imgs/c.png,masks/empty.png,\n")  # mask only, empty: a lesion-free image
    res = manifest.load(tmp_path)
    a, b, c = res.cases
    assert (a.has_mask, a.has_label, a.has_lesion) == (True, False, True)
    np.testing.assert_array_equal(a.mask, blob(0, 0))
    assert (b.has_mask, b.has_label, b.label, b.has_lesion) == (False, True, Label.BENIGN, True)
    assert not b.mask.any()
    assert (c.has_mask, c.has_label, c.has_lesion) == (True, False, False)


def test_manifest_row_with_neither_mask_nor_label_is_refused_naming_it(tmp_path):
    make_manifest(tmp_path, "image,mask,label\nimgs/a.png,masks/a1.png,malignant\nimgs/b.png,,\n")
    with pytest.raises(DataError, match=r"manifest\.csv row 3: neither a mask nor a label"):
        manifest.load(tmp_path)


def test_manifest_missing_column(tmp_path):
    make_manifest(tmp_path, "image,mask\nimgs/a.png,\n")
    with pytest.raises(DataError, match=r"manifest\.csv.*label missing"):
        manifest.load(tmp_path)


# --- dispatch ----------------------------------------------------------------------------------

def test_discover_and_detect(tmp_path):
    make_busi(tmp_path / "busi")
    make_uclm(tmp_path / "BUS_UCLM")
    make_breast(tmp_path / "BrEaST")
    make_udiat(tmp_path / "udiat-b")
    make_manifest(tmp_path / "HospitalX")
    (tmp_path / "other").mkdir()
    found = discover_centres(tmp_path)
    assert found == {"BUSI": tmp_path / "busi", "BUS-UCLM": tmp_path / "BUS_UCLM",
                     "BrEaST": tmp_path / "BrEaST"}
    assert [detect_format(tmp_path / n) for n in
            ("busi", "BUS_UCLM", "BrEaST", "udiat-b", "HospitalX")] == [
        "BUSI", "BUS-UCLM", "BrEaST", "UDIAT", "manifest"]
    with pytest.raises(DataError, match="other"):
        detect_format(tmp_path / "other")
    assert len(load_site(tmp_path / "udiat-b")) == 2
    assert len(load_site(tmp_path / "HospitalX" / "manifest.csv")) == 2
    assert len(load_centre("bus-uclm", tmp_path / "BUS_UCLM")) == 4


def test_load_centre_strict_and_lenient(tmp_path):
    make_busi(tmp_path)
    (tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (9).png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"benign \(9\)"):
        load_centre("BUSI", tmp_path)
    assert len(load_centre("BUSI", tmp_path, strict=False)) == 5
    with pytest.raises(ValueError, match="unknown data format"):
        load_centre("Nowhere", tmp_path)


# --- real data ---------------------------------------------------------------------------------

REAL_COUNTS = {  # the shared copies (docs/data.md) minus documented drops (see each module's docstring)
    "BrEaST": {Label.BENIGN: 154, Label.MALIGNANT: 98, Label.NORMAL: 4},
    "BUSI": {Label.BENIGN: 436, Label.MALIGNANT: 209, Label.NORMAL: 133},
    "BUS-UCLM": {Label.BENIGN: 170, Label.MALIGNANT: 90, Label.NORMAL: 419},
}


@pytest.mark.integration
@pytest.mark.parametrize("centre", sorted(REAL_COUNTS))
def test_real_centre_counts(data_root, centre):
    roots = discover_centres(data_root)
    if centre not in roots:
        pytest.skip(f"{centre} not in {data_root}")
    assert detect_format(roots[centre]) == centre
    res = load_format(centre, roots[centre], strict=False)
    assert Counter(c.label for c in res.cases) == REAL_COUNTS[centre]
    for case in res.cases:
        assert case.image.dtype == np.uint8 and case.mask.dtype == bool
        assert case.image.shape == case.mask.shape and case.image.ndim == 2
        assert case.has_lesion == (case.label != Label.NORMAL)


@pytest.mark.integration
def test_real_known_quirks(data_root):
    roots = discover_centres(data_root)
    if not {"BUSI", "BUS-UCLM", "BrEaST"} <= set(roots):
        pytest.skip("not all three shared centres present")
    assert load_centre("BUSI", roots["BUSI"])  # strict passes: the conflict is a warning
    with pytest.raises(DataError) as info:
        load_centre("BUS-UCLM", roots["BUS-UCLM"])
    assert all(f"HESN_00{k}.png" in str(info.value) for k in (2, 3, 4, 5))
    cases = {c.case_id: c for c in load_centre("BrEaST", roots["BrEaST"])}
    tumour = read_mask(roots["BrEaST"] / breast.IMAGES_DIR / "case022_tumor.png")
    np.testing.assert_array_equal(cases["case022"].mask, tumour)  # other findings not merged
    assert cases["case022"].descriptors["Other_findings"] == "2"


def test_centres_constant():
    assert CENTRES == ("BrEaST", "UDIAT", "BUSI", "BUS-UCLM")
