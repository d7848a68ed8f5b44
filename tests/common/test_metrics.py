import math

import numpy as np
import pytest

from common import metrics


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


def test_dice_iou_two_overlapping_squares():
    # 10x10 squares shifted by 5 columns: overlap 10x5 = 50 px
    a, b = square(32, 5, 5, 10), square(32, 5, 10, 10)
    assert metrics.dice(a, b) == pytest.approx(2 * 50 / (100 + 100))
    assert metrics.iou(a, b) == pytest.approx(50 / 150)


def test_dice_iou_perfect_disjoint_and_empty_truth():
    a = square(16, 2, 2, 4)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0
    assert metrics.dice(a, square(16, 10, 10, 4)) == 0.0
    empty = np.zeros((16, 16), bool)
    assert math.isnan(metrics.dice(a, empty)) and math.isnan(metrics.iou(empty, empty))
    assert metrics.dice(empty, a) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


@pytest.mark.parametrize("shift", [1, 3, 6])
def test_hd95_of_shifted_square_is_the_shift(shift):
    a, b = square(48, 10, 10, 16), square(48, 10, 10 + shift, 16)
    assert metrics.hd95(a, b) == pytest.approx(shift)
    assert metrics.hd95(a, a) == 0.0


def test_hd95_spacing_and_empty_cases():
    a, b = square(48, 10, 10, 16), square(48, 10, 14, 16)
    assert metrics.hd95(a, b, spacing_mm=0.5) == pytest.approx(2.0)
    empty = np.zeros_like(a)
    assert math.isnan(metrics.hd95(a, empty))
    assert metrics.hd95(empty, a) == pytest.approx(math.hypot(48, 48))  # documented penalty
    assert metrics.hd95(empty, a, spacing_mm=0.1) == pytest.approx(0.1 * math.hypot(48, 48))


def test_auc_perfect_inverted_ties_and_one_class():
    y = np.array([0, 0, 1, 1])
    assert metrics.binary_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.binary_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.binary_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one positive ranked between the negatives: 3 of 4 pairs correct
    assert metrics.binary_auc([0, 1, 0, 1], [0.1, 0.5, 0.6, 0.9]) == pytest.approx(0.75)
    assert math.isnan(metrics.binary_auc([1, 1], [0.2, 0.3]))


def test_sens_spec():
    sens, spec = metrics.sens_spec([1, 1, 1, 0, 0], [1, 1, 0, 0, 1])
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(1 / 2)
    assert math.isnan(metrics.sens_spec([0, 0], [0, 1])[0])


def test_bootstrap_ci_contains_mean_ignores_nan_and_is_seeded():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(0.7, 0.1, 200), [np.nan] * 5])
    lo, hi = metrics.bootstrap_ci(v, n=500, seed=3)
    assert lo < np.nanmean(v) < hi and hi - lo < 0.1
    assert metrics.bootstrap_ci(v, n=500, seed=3) == (lo, hi)
    lo_med, hi_med = metrics.bootstrap_ci(v, n=200, stat=lambda s: float(np.median(s)))
    assert lo_med < np.nanmedian(v) < hi_med
    assert all(math.isnan(x) for x in metrics.bootstrap_ci([np.nan, np.nan]))


def test_paired_wilcoxon():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.4, 0.6, 30)
    assert metrics.paired_wilcoxon(a + 0.2, a) < 1e-4
    assert math.isnan(metrics.paired_wilcoxon(a, a))
    assert math.isnan(metrics.paired_wilcoxon(a[:5] + 1, a[:5]))
    b = a + 0.2
    b[:26] = np.nan  # only 4 valid pairs left
    assert math.isnan(metrics.paired_wilcoxon(b, a))


def test_brier_score_by_hand():
    # (0.9-1)^2 + (0.2-0)^2 + (0.5-1)^2 + (0-0)^2 = 0.01 + 0.04 + 0.25 + 0 → /4
    assert metrics.brier_score([1, 0, 1, 0], [0.9, 0.2, 0.5, 0.0]) == pytest.approx(0.075)
    assert metrics.brier_score([1, 0, float("nan")], [1.0, 0.0, 0.3]) == 0.0  # NaN pair dropped
    assert math.isnan(metrics.brier_score([], []))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        metrics.brier_score([1], [1.5])


def test_reliability_bins_and_ece_by_hand():
    y = [0, 1, 1, 1, 0, 1]
    p = [0.05, 0.15, 0.95, 1.0, 0.92, 0.99]
    bins = metrics.reliability_bins(y, p, n_bins=10)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 4]  # p = 1.0 in the last bin
    assert bins[0]["low"] == 0.0 and bins[9]["high"] == 1.0
    assert bins[9]["mean_p"] == pytest.approx((0.95 + 1.0 + 0.92 + 0.99) / 4)
    assert bins[9]["observed"] == pytest.approx(0.75)
    assert math.isnan(bins[5]["mean_p"])
    # |0 − 0.05|·1/6 + |1 − 0.15|·1/6 + |0.75 − 0.965|·4/6
    want = 0.05 / 6 + 0.85 / 6 + abs(0.75 - 0.965) * 4 / 6
    assert metrics.expected_calibration_error(y, p, n_bins=10) == pytest.approx(want)


def test_a_perfectly_calibrated_predictor_has_zero_ece():
    # a bin at 0.25 holding one positive in four, a bin at 0.75 holding three in four
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25] * 4 + [0.75] * 4
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.0)  # mean 0.5 vs 0.5
    assert metrics.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert math.isnan(metrics.expected_calibration_error([], []))
    with pytest.raises(ValueError):
        metrics.reliability_bins([1], [0.5], n_bins=0)
