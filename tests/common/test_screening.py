"""common/screening.py: each check on hand-computable arrays."""
from __future__ import annotations

import numpy as np
import pytest

from common.screening import (
    RejectionStreaks,
    ScreenLimits,
    Update,
    count_problem,
    lower_median,
    nonfinite_keys,
    schema_problem,
    screen_updates,
    update_norm,
)

GLOBAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(1, np.float32), "n": np.array([5], np.int64)}


def _moved(dw: float, db: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), dw, np.float32), "b": np.array([db], np.float32), "n": np.array([5], np.int64)}


def test_schema_names_shapes_and_dtypes_must_be_those_sent() -> None:
    assert schema_problem(_moved(1.0), GLOBAL) == ""
    assert "1 unexpected ['x']" in schema_problem({**_moved(1.0), "x": np.zeros(1)}, GLOBAL)
    assert "1 missing ['b']" in schema_problem({k: v for k, v in _moved(1.0).items() if k != "b"}, GLOBAL)
    assert "shape (4,)" in schema_problem({**_moved(1.0), "w": np.zeros(4, np.float32)}, GLOBAL)
    assert "dtype float64" in schema_problem({**_moved(1.0), "w": np.zeros((2, 2))}, GLOBAL)


def test_nonfinite_keys_name_nan_and_inf_arrays_only() -> None:
    bad = {**_moved(1.0), "b": np.array([np.inf], np.float32)}
    bad["w"][0, 1] = np.nan
    assert nonfinite_keys(bad) == ["b", "w"]
    assert nonfinite_keys(_moved(1e30)) == []  # large but finite in float32


def test_count_must_be_a_positive_integer_within_the_declared_size() -> None:
    assert count_problem(16.0, 16) == "" and count_problem(3.0, None) == ""
    assert "exceeds the 16" in count_problem(17.0, 16)
    assert "exceeds" in count_problem(1e9, 16)
    for bad in (0.0, -2.0, 2.5, float("nan")):
        assert "not a positive integer" in count_problem(bad, 16)


def test_update_norm_is_the_euclidean_distance_over_all_arrays() -> None:
    assert update_norm(_moved(1.0, 3.0), GLOBAL) == pytest.approx(np.sqrt(4 * 1.0 + 9.0))  # sqrt(13)
    assert update_norm(_moved(1e30), GLOBAL) == pytest.approx(2e30, rel=1e-6)  # no float32 overflow


def test_lower_median_takes_the_smaller_middle_of_an_even_count() -> None:
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([10.0, 1.0]) == 1.0
    with pytest.raises(ValueError):
        lower_median([])


def test_screen_rejects_by_reason_and_keeps_the_rest() -> None:
    nan = _moved(1.0)
    nan["w"][0, 0] = np.nan
    updates = {
        "A": Update(_moved(1.0), 10, 10),   # norm 2
        "B": Update(_moved(1.5), 20, 20),   # norm 3
        "C": Update(_moved(0.5), 5, 5),     # norm 1
        "D": Update(_moved(40.0), 10, 10),  # norm 80 > 10 × median(1, 2, 3, 80 → lower 2) = 20
        "E": Update(_moved(1.0), 1e9, 10),  # inflated count: rejected, not clipped
        "F": Update(nan, 10, 10),
        "G": Update({"w": GLOBAL["w"]}, 10, 10),
    }
    v = screen_updates(updates, GLOBAL, ScreenLimits(norm_factor=10.0))
    assert v.accepted == ("A", "B", "C")
    assert {s: [c for c, _ in r] for s, r in v.rejected.items()} == {
        "D": ["norm"], "E": ["num-examples"], "F": ["non-finite"], "G": ["schema"]}
    assert v.bound == pytest.approx(20.0)  # clean norms 2, 3, 1, 80: lower median 2
    assert "update norm 80 exceeds 10 × the round's median 2" in v.reason("D")
    assert set(v.norms) == {"A", "B", "C", "D", "E"}


def test_inflated_count_with_a_huge_update_gets_both_reasons() -> None:
    rng = np.random.default_rng(0)
    noisy = {**_moved(0.0), "w": (10 * rng.normal(size=(2, 2))).astype(np.float32)}
    v = screen_updates({"A": Update(_moved(0.1), 8, 8), "B": Update(_moved(0.2), 8, 8),
                        "H": Update(noisy, 1e9, 8)}, GLOBAL, ScreenLimits(norm_factor=10.0))
    assert v.accepted == ("A", "B") and [c for c, _ in v.rejected["H"]] == ["num-examples", "norm"]


def test_two_sites_the_larger_update_is_held_to_the_smaller() -> None:
    v = screen_updates({"A": Update(_moved(1.0), 8, 8), "H": Update(_moved(11.0), 8, 8)}, GLOBAL,
                       ScreenLimits(norm_factor=10.0))
    assert v.accepted == ("A",) and "H" in v.rejected  # 22 > 10 × 2


def test_absolute_cap_applies_even_when_every_update_is_alike() -> None:
    updates = {s: Update(_moved(1e30), 8, 8) for s in "ABC"}
    assert screen_updates(updates, GLOBAL, ScreenLimits()).accepted == ("A", "B", "C")  # relative only
    capped = screen_updates(updates, GLOBAL, ScreenLimits(norm_cap=100.0))
    assert capped.accepted == () and all(r[0][0] == "norm-cap" for r in capped.rejected.values())


def test_streaks_drop_after_n_rejections_in_a_row_and_reset_on_acceptance() -> None:
    s = RejectionStreaks(drop_after=2)
    assert s.update(["A"], ["B", "C"]) == []
    assert s.update(["C"], ["B"]) == ["B"]  # B twice running; C reset by its accepted update
    assert s.update([], ["C"]) == []
    assert s.update([], []) == []  # a round C missed (failure) neither resets nor counts
    restored = RejectionStreaks(drop_after=2)
    restored.load_state_dict(s.state_dict())
    assert restored.update([], ["C"]) == ["C"]
    with pytest.raises(ValueError):
        RejectionStreaks(0)


def test_federation_config_validates_the_screening_thresholds() -> None:
    from common.config import ConfigError, FederationConfig

    fed = FederationConfig()
    assert (fed.screen_norm_factor, fed.screen_norm_cap, fed.drop_after_rejections) == (10.0, None, 3)
    for bad in ({"screen_norm_factor": 0.5}, {"screen_norm_factor": float("nan")}, {"screen_norm_cap": 0.0},
                {"drop_after_rejections": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            FederationConfig(**bad)


def test_step_counters_are_not_part_of_the_update_norm() -> None:
    """A site with ten times the data takes ten times the steps: its prior's step counter must
    not make it an outlier (nor take the client-level DP clipping norm)."""
    from common.clipping import clip_update

    ref = {"w": np.zeros(2, np.float32), "prior.num_updates": np.array(10.0, np.float32)}
    big = {"w": np.array([3.0, 4.0], np.float32), "prior.num_updates": np.array(510.0, np.float32)}
    assert update_norm(big, ref) == pytest.approx(5.0)
    out, norm = clip_update(big, ref, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
    assert float(out["prior.num_updates"]) == 510.0  # passed as sent
