"""common/calibration.py: temperature scaling from grid statistics, on cases whose answer is
known by hand (T = 1 for calibrated logits, T = 3 for logits scaled ×3), sites' statistics
merging to the pooled fit, and the checks a server applies to a site's reply."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common import calibration
from common.calibration import (
    GRID,
    CalibrationError,
    apply_temperature,
    before_after,
    best_index,
    fit,
    fit_temperature,
    from_record,
    grid_nll,
    merge,
    to_record,
)

LOG3 = math.log(3.0)
# sigmoid(±log 3) = 0.75 / 0.25, and 3 of 4 images at +log 3 are malignant (1 of 4 at −log 3):
# these logits are exactly calibrated, NLL(T) is smallest at T = 1
Z = np.array([LOG3] * 4 + [-LOG3] * 4)
Y = np.array([1, 1, 1, 0, 0, 0, 0, 1])


def logistic_sample(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z ~ N(0, 2²) and labels drawn from the logistic model y ~ Bernoulli(sigmoid(z))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    return z, (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)


def test_the_grid_is_61_log_spaced_points_from_a_quarter_to_8_with_1_on_it() -> None:
    assert len(GRID) == 61 and GRID[0] == pytest.approx(0.25) and GRID[-1] == pytest.approx(8.0)
    assert GRID[24] == 1.0 and np.allclose(GRID[1:] / GRID[:-1], 2 ** (1 / 12))


def test_grid_nll_at_t_1_is_the_log_loss_by_hand() -> None:
    stats = grid_nll(Z, Y)
    assert stats.count == 8
    assert stats.nll[24] == pytest.approx(-6 * math.log(0.75) - 2 * math.log(0.25))
    # T = 2: sigmoid(log 3 / 2) = √3 / (1 + √3)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    assert stats.nll[36] == pytest.approx(-6 * math.log(p) - 2 * math.log(1 - p))


def test_calibrated_logits_give_t_1() -> None:
    stats = grid_nll(Z, Y)
    assert best_index(stats) == 24
    assert fit_temperature(stats, min_count=1) == pytest.approx(1.0, rel=0.01)


def test_overconfident_logits_scaled_by_3_give_t_3() -> None:
    assert fit(3 * Z, Y, min_count=1) == pytest.approx(3.0, rel=0.01)


def test_logistic_model_samples_give_t_near_1_and_scaled_ones_t_near_3() -> None:
    z, y = logistic_sample()
    assert fit(z, y) == pytest.approx(1.0, abs=0.1)
    assert fit(3 * z, y) == pytest.approx(3.0, rel=0.1)
    assert fit(z / 2, y) == pytest.approx(0.5, rel=0.1)  # under-confident: T < 1


def test_two_sites_merged_equal_the_pooled_data() -> None:
    z, y = logistic_sample(n=600, seed=4)
    z = 2.5 * z
    a, b = grid_nll(z[:250], y[:250]), grid_nll(z[250:], y[250:])
    pooled, merged = grid_nll(z, y), merge([a, b])
    assert merged.count == pooled.count == 600
    np.testing.assert_allclose(merged.nll, pooled.nll, rtol=1e-12)
    assert fit_temperature(merged) == pytest.approx(fit_temperature(pooled), rel=1e-9)
    assert fit_temperature(pooled) > 2.0


def test_non_finite_pairs_are_left_out_and_too_few_images_keep_t_1() -> None:
    stats = grid_nll(np.append(Z, [np.nan, np.inf]), np.append(Y, [1, 0]))
    assert stats.count == 8 and stats.nll == grid_nll(Z, Y).nll
    assert fit_temperature(stats) == 1.0  # 8 < MIN_COUNT
    assert fit_temperature(merge([])) == 1.0


def test_apply_temperature_by_hand() -> None:
    p = 27 / 28  # sigmoid(3 log 3)
    assert apply_temperature([p], 3.0)[0] == pytest.approx(0.75)
    assert apply_temperature([0.75], 1 / 3)[0] == pytest.approx(p)
    np.testing.assert_allclose(apply_temperature([0.2, 0.5, 0.9], 1.0), [0.2, 0.5, 0.9])


def test_calibration_lowers_ece_and_brier_of_overconfident_probabilities() -> None:
    z, y = logistic_sample(n=3000, seed=2)
    raw = 1 / (1 + np.exp(-3 * z))
    t = fit(3 * z, y)
    out = before_after(y, raw, apply_temperature(raw, t))
    assert out["ece"] < out["ece_raw"] / 2 and out["brier"] < out["brier_raw"]


def test_a_sites_record_round_trips_and_bad_replies_are_refused() -> None:
    stats = grid_nll(Z, Y)
    assert from_record(to_record(stats), max_count=8) == stats
    good = to_record(stats)
    bad = [
        {**good, "nll": good["nll"][:-1]},  # wrong length
        {**good, "nll": [math.nan] + good["nll"][1:]},  # not finite
        {**good, "nll": [-1.0] + good["nll"][1:]},  # negative
        {**good, "nll": ["x"] * 61},
        {**good, "count": True},
        {**good, "count": 3.5},
        {**good, "count": -1},
        {"count": 8},
        {**good, "count": 0},  # sums without images
    ]
    for record in bad:
        with pytest.raises(CalibrationError):
            from_record(record, max_count=100)
    with pytest.raises(CalibrationError, match="more than the 7 declared"):
        from_record(good, max_count=7)


def test_summary_says_what_was_fitted() -> None:
    z, y = logistic_sample(n=400, seed=1)
    stats = grid_nll(3 * z, y)
    t = fit_temperature(stats)
    info = calibration.summary(stats, t, "training", {"A": 400})
    assert info["fitted"] and info["n"] == 400 and info["split"] == "training"
    assert info["nll_after"] < info["nll_before"]
    assert not calibration.summary(grid_nll(Z, Y), 1.0, "validation", {"A": 8})["fitted"]


def test_check_temperature_refuses_non_positive_and_non_finite() -> None:
    assert calibration.check_temperature(2) == 2.0
    for bad in (0, -1.0, math.inf, math.nan, "x", None, True):
        with pytest.raises(CalibrationError):
            calibration.check_temperature(bad)
