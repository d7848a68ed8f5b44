"""common/fedmetrics.py: the fixed reply schemas, the sentinel and pooling over sites by hand."""
from __future__ import annotations

import pytest

from common.fedmetrics import (
    EVAL_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    UNDEFINED,
    aggregate_site_metrics,
    eval_metrics,
    train_metrics,
)


def test_eval_metrics_replace_nan_by_the_sentinel_and_keep_the_schema() -> None:
    summary = {"dice": float("nan"), "iou": float("nan"), "hd95": float("inf"), "auc": float("nan"),
               "sensitivity": float("nan"), "specificity": 0.75, "accuracy": 0.75,
               "n_images": 4, "n_lesion": 0}
    m = eval_metrics(summary, n_malignant=0, seconds=0.5)
    assert tuple(m) == EVAL_METRIC_KEYS
    assert m["dice"] == m["hd95"] == m["auc"] == m["sensitivity"] == UNDEFINED
    assert m["specificity"] == 0.75 and m["num-examples"] == 4.0 and m["n_malignant"] == 0.0


def test_train_metrics_follow_the_schema() -> None:
    m = train_metrics(10, 0.5, {"seg": 0.3, "cls": 0.2, "consistency": float("nan")}, steps=3, seconds=1.0)
    assert tuple(m) == TRAIN_METRIC_KEYS
    assert m["consistency"] == UNDEFINED and m["prior_sup"] == UNDEFINED and m["epsilon"] == UNDEFINED
    assert m["num-examples"] == 10.0


def _site(dice: float, n_lesion: int, sens: float, n_mal: int, spec: float, n: int) -> dict[str, float]:
    s = dict.fromkeys(EVAL_METRIC_KEYS, 0.0)
    s.update(dice=dice, iou=dice, hd95=dice, auc=0.5, sensitivity=sens, specificity=spec, accuracy=0.5,
             n_lesion=n_lesion, n_malignant=n_mal, n_images=n, seconds=n / 10)
    s["num-examples"] = n
    return s


def test_evaluate_pooling_weights_each_metric_by_its_own_count() -> None:
    per_site = {
        "A": _site(dice=0.5, n_lesion=2, sens=1.0, n_mal=1, spec=0.5, n=4),
        "B": _site(dice=0.8, n_lesion=8, sens=0.5, n_mal=4, spec=1.0, n=10),
        "C": _site(dice=UNDEFINED, n_lesion=0, sens=UNDEFINED, n_mal=0, spec=1.0, n=2),
    }
    agg = aggregate_site_metrics(per_site, "evaluate")
    assert agg["dice"] == pytest.approx((0.5 * 2 + 0.8 * 8) / 10)  # C has no lesion: ignored
    assert agg["sensitivity"] == pytest.approx((1.0 * 1 + 0.5 * 4) / 5)
    assert agg["specificity"] == pytest.approx((0.5 * 3 + 1.0 * 6 + 1.0 * 2) / 11)
    assert agg["n_images"] == 16 and agg["seconds"] == 1.0


def test_pooling_is_undefined_when_no_site_defines_a_metric() -> None:
    per_site = {"A": _site(dice=UNDEFINED, n_lesion=0, sens=UNDEFINED, n_mal=0, spec=1.0, n=3)}
    assert aggregate_site_metrics(per_site, "evaluate")["dice"] == UNDEFINED


def test_train_pooling_weights_losses_by_examples_and_takes_the_slowest_site() -> None:
    a = train_metrics(1, 1.0, {"seg": 1.0, "cls": 0, "consistency": 0, "prior_sup": 0}, 1, 2.0)
    b = train_metrics(3, 3.0, {"seg": 3.0, "cls": 0, "consistency": 0, "prior_sup": 0}, 2, 5.0)
    agg = aggregate_site_metrics({"A": a, "B": b}, "train")
    assert agg["train_loss"] == pytest.approx(2.5) and agg["seg"] == pytest.approx(2.5)
    assert agg["seconds"] == 5.0 and agg["num-examples"] == 4 and agg["steps"] == 3
