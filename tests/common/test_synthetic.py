"""Synthetic centres: deterministic, consistent labels/masks, distinct centres, BI-RADS-shaped class
differences measured on the masks alone."""
from collections import defaultdict

import numpy as np
import pytest

from common.data.synthetic import SYNTHETIC_CENTRES, make_centre, make_federation
from common.records import Label


def _shape(mask: np.ndarray) -> tuple[float, float]:
    """(height / width of the bounding box, compactness perimeter² / (4π·area)); a disc gives ≈ 1
    for both (a digital disc's 4-connected perimeter makes its compactness ≈ 4/π ≈ 1.27)."""
    ys, xs = np.nonzero(mask)
    m = mask.astype(int)
    perimeter = np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum()
    return (np.ptp(ys) + 1) / (np.ptp(xs) + 1), perimeter**2 / (4 * np.pi * m.sum())


def test_shape_helper_on_hand_made_masks() -> None:
    wide = np.zeros((20, 20), bool)
    wide[8:12, 2:18] = True  # 4 tall × 16 wide: ratio 0.25, perimeter 40, area 64
    assert _shape(wide) == pytest.approx((0.25, 40**2 / (4 * np.pi * 64)))


def test_deterministic_and_seed_dependent() -> None:
    a, b = make_centre("SynPL", 6, size=32, seed=3), make_centre("SynPL", 6, size=32, seed=3)
    c = make_centre("SynPL", 6, size=32, seed=4)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert (x.label, x.case_id, x.patient_id) == (y.label, y.case_id, y.patient_id)
        assert x.descriptors == y.descriptors
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


@pytest.mark.parametrize("name", sorted(SYNTHETIC_CENTRES))
def test_labels_masks_and_types_consistent(name: str) -> None:
    size = 40
    cases = make_centre(name, 16, size=size, seed=0)
    assert len(cases) == 16 and len({c.case_id for c in cases}) == 16
    for case in cases:
        assert case.centre == name
        assert case.image.dtype == np.uint8 and case.image.shape == (size, size)
        assert case.mask.dtype == bool and case.mask.shape == (size, size)
        assert case.has_lesion == (case.label != Label.NORMAL)
        if case.label == Label.NORMAL:
            assert set(case.descriptors.values()) == {"not applicable"}
        else:  # the whole lesion inside the frame: nothing on the border rows/columns
            border = np.concatenate([case.mask[0], case.mask[-1], case.mask[:, 0], case.mask[:, -1]])
            assert not border.any()
            assert case.descriptors["Shape"] in {"oval", "round", "irregular"}
            assert case.descriptors["Posterior_features"] in {"enhancement", "shadowing", "no"}
            height, width = np.ptp(np.nonzero(case.mask)[0]), np.ptp(np.nonzero(case.mask)[1])
            assert case.descriptors["Orientation"] == ("not parallel" if height > width else "parallel")
        style = SYNTHETIC_CENTRES[name]
        assert case.spacing_mm == (pytest.approx(style.fov_mm / size) if style.reports_spacing else None)


def test_class_counts_follow_the_centre() -> None:
    # SynES2: 40 % normal → round(20·0.4) = 8 normal; 12 lesions, 34 % malignant → round(4.08) = 4.
    labels = [c.label for c in make_centre("SynES2", 20, size=32)]
    assert [labels.count(k) for k in (Label.NORMAL, Label.MALIGNANT, Label.BENIGN)] == [8, 4, 8]
    # Both lesion classes whenever there are two lesion images: SynPL, n=2 → 1 malignant, 1 benign.
    assert sorted(c.label for c in make_centre("SynPL", 2, size=32)) == [Label.BENIGN, Label.MALIGNANT]


def test_patients_group_consecutive_images_with_one_label() -> None:
    by_patient = defaultdict(list)
    for i, case in enumerate(make_centre("SynES2", 30, size=32, seed=2)):
        by_patient[case.patient_id].append((i, case.label))
    assert len(by_patient) < 30  # some patients have several images
    for rows in by_patient.values():
        indices = [i for i, _ in rows]
        assert indices == list(range(indices[0], indices[0] + len(indices)))
        assert len({label for _, label in rows}) == 1
    single = make_centre("SynPL", 10, size=32)  # one image per patient there
    assert len({c.patient_id for c in single}) == 10


def test_centres_differ_in_intensity_statistics() -> None:
    fed = make_federation(12, size=32, seed=0)
    assert list(fed) == list(SYNTHETIC_CENTRES) and all(len(v) == 12 for v in fed.values())
    pixels = {c: np.stack([x.image for x in cases]).astype(float) for c, cases in fed.items()}
    means, stds = {c: v.mean() for c, v in pixels.items()}, {c: v.std() for c, v in pixels.items()}
    names = list(means)
    for i, a in enumerate(names):  # every pair of centres differs in mean or spread of grey levels
        for b in names[i + 1 :]:
            assert abs(means[a] - means[b]) > 4 or abs(stds[a] - stds[b]) > 4, (a, b, means, stds)
    # the brightest (BUSI-like) and the darkest (dark fan) centre by a wide margin
    assert max(means, key=means.get) == "SynEG" and min(means, key=means.get) == "SynES1"
    assert make_federation(3, size=32, centres=["SynEG"]).keys() == {"SynEG"}


def test_sector_centre_keeps_lesions_inside_the_fan() -> None:
    for case in make_centre("SynES1", 10, size=48, seed=1):
        assert case.image[0, 0] == 0 and case.image[0, -1] == 0  # black corners outside the fan
        for y, x in zip(*np.nonzero(case.mask)):
            lit = np.nonzero(case.image[y] > 0)[0]
            assert lit.min() < x < lit.max()


def test_malignant_taller_and_less_compact_than_benign() -> None:
    cases = make_centre("SynPL", 80, size=64, seed=1)
    shape = {lab: np.array([_shape(c.mask) for c in cases if c.label == lab])
             for lab in (Label.BENIGN, Label.MALIGNANT)}
    benign, malignant = shape[Label.BENIGN].mean(0), shape[Label.MALIGNANT].mean(0)
    assert malignant[0] > 1.0 > benign[0]  # taller-than-wide vs parallel, on average
    assert malignant[1] > benign[1] + 0.1  # less compact
    # …but the classes overlap: some benign masses are taller than wide, some malignant wider.
    assert (shape[Label.BENIGN][:, 0] > 1).any() and (shape[Label.MALIGNANT][:, 0] < 1).any()


def test_unknown_centre_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown synthetic centre"):
        make_centre("Nowhere", 1)
