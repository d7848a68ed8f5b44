"""Synthetic centres: deterministic, consistent labels/masks, BI-RADS-shaped class differences."""
import numpy as np
import pytest

from common.data.synthetic import SYNTHETIC_CENTRES, make_centre, make_federation
from common.records import Label


def _moments(mask: np.ndarray) -> tuple[float, float]:
    """(height/width ratio from second moments, compactness perimeter²/(4π·area))."""
    ys, xs = np.nonzero(mask)
    ratio = ys.std() / max(xs.std(), 1e-6)
    m = mask.astype(int)
    perimeter = np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum()
    return ratio, perimeter**2 / (4 * np.pi * m.sum())


def test_deterministic_and_seed_dependent() -> None:
    a, b = make_centre("SynPL", 6, size=48, seed=3), make_centre("SynPL", 6, size=48, seed=3)
    c = make_centre("SynPL", 6, size=48, seed=4)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_labels_masks_and_types_consistent() -> None:
    for case in make_centre("SynES2", 40, size=48, seed=0):
        assert case.image.dtype == np.uint8 and case.image.shape == (48, 48)
        assert case.mask.dtype == bool and case.mask.shape == (48, 48)
        assert case.has_lesion == (case.label != Label.NORMAL)
        if case.has_lesion:  # lesion fully inside the frame
            assert not (case.mask[0].any() or case.mask[-1].any() or case.mask[:, 0].any() or case.mask[:, -1].any())


def test_centres_differ_in_intensity() -> None:
    fed = make_federation(30, size=48, seed=0)
    means = {c: np.mean([x.image.mean() for x in cases]) for c, cases in fed.items()}
    assert set(fed) == set(SYNTHETIC_CENTRES)
    assert max(means.values()) - min(means.values()) > 10  # grey levels


def test_multi_image_patients_exist() -> None:
    cases = make_centre("SynES2", 12, size=32)
    assert len({c.patient_id for c in cases}) < len(cases)


def test_malignant_taller_and_less_compact_than_benign() -> None:
    cases = make_centre("SynPL", 120, size=96, seed=1)
    stats = {lab: np.array([_moments(c.mask) for c in cases if c.label == lab]) for lab in (Label.BENIGN, Label.MALIGNANT)}
    assert stats[Label.MALIGNANT][:, 0].mean() > stats[Label.BENIGN][:, 0].mean() + 0.2
    assert stats[Label.MALIGNANT][:, 1].mean() > stats[Label.BENIGN][:, 1].mean()


def test_unknown_centre_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown synthetic centre"):
        make_centre("Nowhere", 1)
