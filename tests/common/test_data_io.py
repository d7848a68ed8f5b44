"""Pixel readers: every mode the centres use, and every failure names its file."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data.io import (FileError, MaskFile, assemble_case, cell_text, find_column, fit_mask,
                            load_mask, read_colour_mask, read_grey, read_mask, read_table)
from common.records import DataError, Label


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


GREY = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10


@pytest.fixture(autouse=True)
def _tiny_images_allowed(monkeypatch) -> None:
    """These fixtures are a few px; the under-32-px warning is tested in test_bad_data.py."""
    monkeypatch.setattr("common.data.plausibility.MIN_SIDE", 1)


# --- read_grey -------------------------------------------------------------------------------

def test_grey_l_roundtrip(tmp_path):
    out = read_grey(save(tmp_path / "a.png", GREY))
    assert out.dtype == np.uint8 and out.shape == (4, 6)
    np.testing.assert_array_equal(out, GREY)


def test_grey_rgb_of_grey_content_is_unchanged_and_colour_uses_luma(tmp_path):
    rgb = np.repeat(GREY[..., None], 3, axis=2)
    rgb[0, 0] = (255, 0, 0)  # a red calliper mark: 0.299*255 = 76.2
    out = read_grey(save(tmp_path / "a.png", rgb))
    assert out[0, 0] == 76
    np.testing.assert_array_equal(out.ravel()[1:], GREY.ravel()[1:])


def test_grey_ignores_alpha(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = GREY[..., None]
    rgba[..., 3] = 0  # fully transparent, content still there
    np.testing.assert_array_equal(read_grey(save(tmp_path / "a.png", rgba)), GREY)


def test_grey_from_la_palette_and_bilevel(tmp_path):
    la = np.stack([GREY, np.zeros_like(GREY)], axis=2)
    np.testing.assert_array_equal(read_grey(save(tmp_path / "la.png", la, "LA")), GREY)
    Image.fromarray(GREY).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "p.png"), GREY)
    Image.fromarray(GREY > 100).save(tmp_path / "one.png")
    assert set(np.unique(read_grey(tmp_path / "one.png"))) == {0, 255}


def test_grey_16_bit_scaled_only_when_wider_than_8_bit(tmp_path):
    wide = np.array([[0, 200, 1000]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "w.png"), [[0, 51, 255]])
    narrow = np.array([[0, 7, 200]], dtype=np.uint16)
    Image.fromarray(narrow).save(tmp_path / "n.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "n.png"), [[0, 7, 200]])


@pytest.mark.parametrize("content", [b"not a png at all", b""])
def test_unreadable_file_names_the_file(tmp_path, content):
    bad = tmp_path / "broken image.png"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="broken image.png"):
        read_grey(bad)


def test_truncated_png_names_the_file(tmp_path):
    good = save(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64),
                                                                          dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(FileError, match="cut.png") as info:
        read_grey(cut)
    assert info.value.kind == "unreadable"


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nothere.png.*not found"):
        read_mask(tmp_path / "nothere.png")


# --- masks -----------------------------------------------------------------------------------

def test_mask_modes(tmp_path):
    m = np.zeros((4, 6), dtype=bool)
    m[1:3, 2:5] = True
    Image.fromarray(m).save(tmp_path / "one.png")                       # mode '1' (BUSI)
    save(tmp_path / "zero_one.png", m.astype(np.uint8))                 # 0/1 label image
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[m] = (0, 255, 0)
    save(tmp_path / "green.png", rgb)                                   # BUS-UCLM benign
    for name in ("one.png", "zero_one.png", "green.png"):
        got = load_mask(tmp_path / name)
        assert got.binary, name
        np.testing.assert_array_equal(got.mask, m)


def test_rgba_masks_are_composited_on_black(tmp_path):
    m = np.zeros((4, 6), dtype=bool)
    m[0, :3] = True
    white_on_clear = np.zeros((4, 6, 4), np.uint8)                     # BrEaST style
    white_on_clear[m] = 255
    np.testing.assert_array_equal(read_mask(save(tmp_path / "a.png", white_on_clear)), m)
    alpha_is_mask = np.full((4, 6, 4), 255, np.uint8)
    alpha_is_mask[..., 3] = m * 255
    np.testing.assert_array_equal(read_mask(save(tmp_path / "b.png", alpha_is_mask)), m)


def test_non_binary_mask_is_thresholded_at_half_max_with_warning(tmp_path, caplog):
    levels = np.array([[0, 100, 200, 101]], dtype=np.uint8)
    path = save(tmp_path / "soft.png", levels)
    got = load_mask(path)
    assert got.levels == 3 and got.below == 1 and not got.binary
    np.testing.assert_array_equal(got.mask, [[False, False, True, True]])
    with caplog.at_level(logging.WARNING):
        read_mask(path)
    assert "soft.png" in caplog.text and "not binary" in caplog.text


def test_colour_mask_reports_colours(tmp_path):
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[0, 0] = (0, 255, 0)
    rgb[2, 2] = (255, 0, 0)
    mask, colours = read_colour_mask(save(tmp_path / "c.png", rgb))
    assert colours == {(0, 255, 0), (255, 0, 0)}
    assert mask.sum() == 2 and mask[0, 0] and mask[2, 2]
    empty, none = read_colour_mask(save(tmp_path / "e.png", np.zeros((3, 3, 3), np.uint8)))
    assert not empty.any() and none == set()


# --- fitting a mask to its image ---------------------------------------------------------------

def test_fit_mask_same_size_untouched():
    m = np.eye(4, dtype=bool)
    out, warn = fit_mask(m, (4, 4), "m.png", "i.png")
    assert out is m and warn is None


def test_fit_mask_rescaled_pair_is_resized_with_warning():
    m = np.zeros((2, 3), dtype=bool)
    m[0, 0] = True
    out, warn = fit_mask(m, (4, 6), "m.png", "i.png")
    assert out.shape == (4, 6) and out[:2, :2].all() and out.sum() == 4
    assert "m.png" in warn and "i.png" in warn and "resized" in warn


def test_fit_mask_other_aspect_ratio_is_an_error():
    m = np.ones((4, 6), dtype=bool)
    with pytest.raises(FileError, match="m.png.*i.png.*aspect") as info:
        fit_mask(m, (5, 6), "m.png", "i.png")
    assert info.value.kind == "mask-size"


def test_fit_mask_empty_mask_of_any_size_becomes_empty():
    out, warn = fit_mask(np.zeros((4, 6), bool), (5, 6), "m.png", "i.png")
    assert out.shape == (5, 6) and not out.any() and "empty" in warn


# --- assembling a case -------------------------------------------------------------------------

def _mf(m: np.ndarray) -> MaskFile:
    return MaskFile(m, 1)


def test_assemble_merges_masks_by_or():
    a = np.zeros((3, 3), bool)
    b = np.zeros((3, 3), bool)
    a[0, 0], b[2, 2] = True, True
    case, notes = assemble_case(np.zeros((3, 3), np.uint8), "i.png",
                                [("a.png", _mf(a)), ("b.png", _mf(b))], Label.BENIGN,
                                case_id="i", patient_id="p", centre="X")
    np.testing.assert_array_equal(case.mask, a | b)
    assert notes == [] and case.source == "i.png"


@pytest.mark.parametrize("label,masks,kind", [
    (Label.MALIGNANT, [], "mask-missing"),
    (Label.BENIGN, [("m.png", MaskFile(np.zeros((3, 3), bool), 0))], "mask-empty"),
    (Label.NORMAL, [("m.png", MaskFile(np.ones((3, 3), bool), 1))], "label"),
])
def test_assemble_rejects_inconsistent_pairs(label, masks, kind):
    with pytest.raises(FileError) as info:
        assemble_case(np.zeros((3, 3), np.uint8), "i.png", masks, label, case_id="i",
                      patient_id="p", centre="X")
    assert info.value.kind == kind


# --- tables ----------------------------------------------------------------------------------

def test_csv_with_bom_and_semicolons(tmp_path):
    p = tmp_path / "INFO.csv"
    p.write_bytes("\ufeffImage;Label\nA_000.png; Benign \n\nA_001.png;\n".encode("utf-8"))
    rows = read_table(p)["INFO.csv"]
    assert rows == [{"Image": "A_000.png", "Label": "Benign"},
                    {"Image": "A_001.png", "Label": None}]


def test_xlsx_cells_become_text(tmp_path):
    p = tmp_path / "t.xlsx"
    pd.DataFrame({"Image": [1, 2], "Size": [0.0078125, None], "BIRADS": [3, "4a"]}).to_excel(
        p, index=False)
    rows = read_table(p)["Sheet1"]
    assert rows[0] == {"Image": "1", "Size": "0.0078125", "BIRADS": "3"}
    assert rows[1]["Size"] is None and rows[1]["BIRADS"] == "4a"


def test_unreadable_table_names_the_file(tmp_path):
    p = tmp_path / "bad.xlsx"
    p.write_bytes(b"garbage")
    with pytest.raises(FileError, match="bad.xlsx"):
        read_table(p)


def test_cell_text_and_find_column():
    assert cell_text(3.0) == "3" and cell_text(float("nan")) is None and cell_text(" x ") == "x"
    assert find_column(["Image name", "TYPE"], "image_name") == "Image name"
    assert find_column(["a"], "b") is None
