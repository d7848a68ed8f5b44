"""Tensor pipeline: shapes, binary masks, full epochs, disk cache."""
import logging
import math

import numpy as np
import pytest
import torch

from common.data.synthetic import make_centre
from common.data.tensors import TensorData, batches, cached_tensors, normalise, to_tensors
from common.records import Case, Label


def _asym_case(h: int = 40, w: int = 60) -> Case:
    """Bright band on the left and at the top; lesion in the upper left."""
    img = np.full((h, w), 60, np.uint8)
    img[:, : w // 4] = 255
    img[: h // 5] = 200
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2, w // 12 : w // 4] = True
    return Case(img, mask, Label.MALIGNANT, "c0", "p0", "X", spacing_mm=0.1)


def _data(n: int = 8, size: int = 32) -> TensorData:
    return to_tensors(make_centre("SynPL", n, size=size), size)


def test_to_tensors_shapes_dtypes_spacing() -> None:
    d = to_tensors([_asym_case()] + make_centre("SynEG", 5, size=48), 32)
    assert d.images.shape == (6, 1, 32, 32) and d.images.dtype == torch.float32
    assert d.masks.shape == (6, 1, 32, 32) and d.masks.dtype == torch.float32
    assert d.labels.dtype == torch.int64 and d.malignant.dtype == torch.float32
    assert d.has_lesion.dtype == torch.bool and d.spacing_mm.dtype == torch.float32
    assert 0 <= d.images.min() and d.images.max() <= 1
    assert set(d.masks.unique().tolist()) <= {0.0, 1.0}
    assert d.malignant[0] == 1 and d.labels[0] == Label.MALIGNANT and d.has_lesion[0]
    assert math.isclose(d.spacing_mm[0].item(), 0.1 * 60 / 32, rel_tol=1e-6)  # along the width
    assert torch.isnan(d.spacing_mm[1:]).all()  # SynEG (BUSI-like) reports no spacing
    assert d.case_ids[0] == "c0" and d.centres[1:] == ["SynEG"] * 5


def test_mixed_shapes_keep_their_order_and_match_one_by_one() -> None:
    cases = [_asym_case(40, 60), _asym_case(30, 30), _asym_case(40, 60)]
    mirrored = cases[2].image[:, ::-1].copy(), cases[2].mask[:, ::-1].copy()
    cases[2] = Case(*mirrored, Label.BENIGN, "c2", "p2", "X")
    together = to_tensors(cases, 24)
    for i, case in enumerate(cases):
        alone = to_tensors([case], 24)
        assert torch.equal(together.images[i], alone.images[0])
        assert torch.equal(together.masks[i], alone.masks[0])


def test_mask_resize_hand_checked() -> None:
    # 8×8 → 4×4: each output pixel averages a 2×2 block; a block ¾ covered stays, ¼ covered goes.
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # full block → 1
    mask[2:4, 2:3] = True  # half block (2 of 4) → 0.5 → kept (≥ 0.5)
    mask[4, 4] = True  # quarter block → dropped
    case = Case(np.zeros((8, 8), np.uint8), mask, Label.BENIGN, "m", "m", "X")
    out = to_tensors([case], 4).masks[0, 0]
    expected = torch.zeros(4, 4)
    expected[0, 0] = expected[1, 1] = 1
    assert torch.equal(out, expected)
    # Upsampling keeps masks binary and roughly scales the area by 4.
    up = to_tensors([case], 16).masks[0, 0]
    assert set(up.unique().tolist()) <= {0.0, 1.0} and 12 <= up.sum().item() <= 36


def test_tiny_lesion_survives_downsampling() -> None:
    c = _asym_case()
    mask = np.zeros_like(c.mask)
    mask[20, 30] = True
    d = to_tensors([Case(c.image, mask, Label.BENIGN, "t", "t", "X")], 16)
    assert d.masks.sum() == 1 and d.has_lesion[0]


def test_malformed_case_names_itself() -> None:
    c = _asym_case()
    bad = Case(c.image, c.mask[:, :10], Label.BENIGN, "broken", "p", "X", source="/x/broken.png")
    with pytest.raises(ValueError, match="broken"):
        to_tensors([bad], 16)
    with pytest.raises(ValueError):
        to_tensors([], 16)


def test_subset_to_concat_and_fingerprint() -> None:
    d = _data(6)
    sub = d.subset([4, 1])
    assert sub.case_ids == [d.case_ids[4], d.case_ids[1]] and torch.equal(sub.images[0], d.images[4])
    assert len(TensorData.concat([d, sub])) == 8 and d.size == 32
    same = d.to("cpu")
    assert same.fingerprint() == d.fingerprint() == _data(6).fingerprint()
    changed = d.subset(range(6))
    changed.images[3, 0, 5, 7] += 0.01
    assert changed.fingerprint() != d.fingerprint()
    assert d.subset([0, 1]).fingerprint() != d.subset([1, 0]).fingerprint()
    with pytest.raises(ValueError, match="inconsistent"):
        TensorData(d.images, d.masks, d.malignant[:2], d.labels, d.has_lesion, d.spacing_mm,
                   d.case_ids, d.centres)


def test_normalise_zero_mean_unit_std() -> None:
    x = torch.rand(3, 1, 16, 16) * 5 + 2
    y = normalise(x)
    assert torch.allclose(y.mean(dim=(-2, -1)), torch.zeros(3, 1), atol=1e-5)
    assert torch.allclose(y.std(dim=(-2, -1)), torch.ones(3, 1), atol=1e-3)
    flat = normalise(torch.full((1, 1, 4, 4), 0.3))  # no NaN/inf; float rounding leaves ≈ 0
    assert torch.isfinite(flat).all() and flat.abs().max() < 0.1
    assert torch.equal(normalise(torch.zeros(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))
    assert torch.allclose(normalise(x * 2 + 1), y, atol=1e-4)  # blind to gain and offset


def test_batches_cover_each_index_once() -> None:
    d = _data(11)
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([b["index"] for b in batches(d, 4, shuffle=True, generator=gen, augment=True)])
    assert sorted(seen.tolist()) == list(range(11))
    assert [len(b["index"]) for b in batches(d, 4, shuffle=False)] == [4, 4, 3]
    assert [len(b["index"]) for b in batches(d, 4, False, drop_last=True)] == [4, 4]
    assert [len(b["index"]) for b in batches(d, 32, False)] == [11]
    assert list(batches(d, 32, False, drop_last=True)) == []  # never an empty batch
    b = next(batches(d, 4, shuffle=False))
    assert set(b) == {"image", "raw", "mask", "malignant", "has_lesion", "has_mask", "has_label",
                      "spacing_mm", "index"}
    assert torch.equal(b["raw"], d.images[:4]) and torch.equal(b["image"], normalise(d.images[:4]))
    assert b["index"].dtype == torch.int64 and torch.equal(b["has_lesion"], d.has_lesion[:4])

    def order(seed: int) -> torch.Tensor:
        return torch.cat([x["index"] for x in batches(d, 4, True, torch.Generator().manual_seed(seed))])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


def test_cache_hit_skips_loader_and_corrupt_cache_rebuilds(tmp_path, caplog) -> None:
    calls = []
    cases = make_centre("SynES1", 4, size=32)

    def load() -> list[Case]:
        calls.append(1)
        return cases

    a = cached_tensors(load, 32, tmp_path, "site/a")
    b = cached_tensors(load, 32, tmp_path, "site/a")
    assert len(calls) == 1 and torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert a.case_ids == b.case_ids and a.fingerprint() == b.fingerprint()
    (cache,) = tmp_path.glob("*.pt")
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left behind
    cache.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="common.data.tensors"):
        c = cached_tensors(load, 32, tmp_path, "site/a")
    assert len(calls) == 2 and torch.equal(a.images, c.images) and "rebuilding" in caplog.text
    cached_tensors(load, 32, tmp_path, "site/a")
    assert len(calls) == 2  # the rebuilt file is good again
    # another size or a key that sanitises to the same name are separate entries
    assert cached_tensors(load, 16, tmp_path, "site/a").images.shape[-1] == 16 and len(calls) == 3
    cached_tensors(load, 32, tmp_path, "site_a")
    assert len(calls) == 4 and len(list(tmp_path.glob("*.pt"))) == 3
