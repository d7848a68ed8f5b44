"""Per-image segmentation metrics and the statistics used in the tables (NumPy/SciPy).

Conventions (stated in every table): Dice, IoU and HD95 are defined only for images whose
ground truth contains a lesion; for an empty truth they return NaN and the NaN-aware summaries
skip them, i.e. segmentation scores are means over lesion images only.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage, stats

ArrayLike = Sequence[float] | np.ndarray

_CROSS = ndimage.generate_binary_structure(2, 1)


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must be equal 2-D shapes")
    return pred, true


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """2|P∩T| / (|P|+|T|) of bool (H,W) masks; NaN when the truth is empty."""
    pred, true = _check_pair(pred, true)
    t = int(true.sum())
    if t == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, true).sum()) / (int(pred.sum()) + t)


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """|P∩T| / |P∪T|; NaN when the truth is empty."""
    pred, true = _check_pair(pred, true)
    if not true.any():
        return float("nan")
    return int(np.logical_and(pred, true).sum()) / int(np.logical_or(pred, true).sum())


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: in the mask with a 4-neighbour outside it (image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def hd95(
    pred: np.ndarray, true: np.ndarray, spacing_mm: float | tuple[float, float] | None = None
) -> float:
    """95th-percentile Hausdorff distance between the boundaries of bool (H,W) masks.

    max(P95 of pred→true boundary distances, P95 of true→pred), the MONAI/MedPy convention.
    In pixels, or in mm when ``spacing_mm`` (mm per pixel; scalar or (row, col)) is given.
    Empty truth: NaN (undefined). Empty prediction with a lesion present: the image diagonal
    (in the same unit), a finite worst-case penalty so means stay defined; say so in tables.
    """
    pred, true = _check_pair(pred, true)
    spacing = (1.0, 1.0) if spacing_mm is None else tuple(np.broadcast_to(spacing_mm, (2,)).astype(float))
    if not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be positive and finite, got {spacing_mm!r}")
    if not true.any():
        return float("nan")
    if not pred.any():
        return float(np.hypot(true.shape[0] * spacing[0], true.shape[1] * spacing[1]))
    sp, st = _surface(pred), _surface(true)
    to_true = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_true, 95), np.percentile(to_pred, 95)))


def binary_auc(y: ArrayLike, score: ArrayLike) -> float:
    """ROC AUC by the rank (Mann–Whitney) formula, ties counted half; pairs with a NaN score are
    dropped; NaN when only one class is present."""
    y = np.asarray(y, dtype=float)
    score = np.asarray(score, dtype=float)
    if y.shape != score.shape:
        raise ValueError(f"y {y.shape} and score {score.shape} differ in shape")
    keep = np.isfinite(score) & np.isfinite(y)
    y, score = y[keep] > 0.5, score[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sens_spec(y: ArrayLike, pred: ArrayLike) -> tuple[float, float]:
    """(sensitivity, specificity) of binary predictions; each NaN when its class is absent."""
    y = np.asarray(y).astype(float) > 0.5
    pred = np.asarray(pred).astype(float) > 0.5
    if y.shape != pred.shape:
        raise ValueError(f"y {y.shape} and pred {pred.shape} differ in shape")
    pos, neg = int(y.sum()), int((~y).sum())
    sens = float((pred & y).sum() / pos) if pos else float("nan")
    spec = float((~pred & ~y).sum() / neg) if neg else float("nan")
    return sens, spec


def bootstrap_ci(
    values: ArrayLike,
    n: int = 2000,
    seed: int = 0,
    stat: Callable[..., float] = np.mean,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1−alpha) CI of ``stat`` over the finite values (NaN ignored).
    (NaN, NaN) when there is no finite value. ``stat`` is called with ``axis=1`` on the (n, m)
    resample matrix when it accepts it, else once per resample."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = v[rng.integers(0, v.size, size=(n, v.size))]
    try:
        boot = np.asarray(stat(samples, axis=1), dtype=float)
    except TypeError:
        boot = np.array([stat(s) for s in samples], dtype=float)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_wilcoxon(a: ArrayLike, b: ArrayLike, min_pairs: int = 6) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired per-image scores.

    Pairs with a NaN on either side are dropped. NaN when fewer than ``min_pairs`` pairs remain
    (below 6 pairs even a perfect shift cannot reach p < 0.05) or all differences are zero.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < min_pairs or np.all(a == b):
        return float("nan")
    return float(stats.wilcoxon(a, b).pvalue)


def _probabilities(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(labels as 0/1, probabilities) over the pairs where both are finite."""
    y, p = np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y {y.shape} and p {p.shape} differ in shape")
    keep = np.isfinite(y) & np.isfinite(p)
    if np.any((p[keep] < 0) | (p[keep] > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    return (y[keep] > 0.5).astype(float), p[keep]


def brier_score(y: ArrayLike, p: ArrayLike) -> float:
    """Mean squared difference between probability ``p`` and outcome ``y`` (0/1); NaN when empty."""
    y, p = _probabilities(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def reliability_bins(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of ``p`` over [0, 1] (the last closed): per bin its edges, ``count``,
    ``mean_p`` (mean predicted probability) and ``observed`` (fraction of positives); the
    means are NaN in an empty bin. Pairs with a NaN are dropped."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _probabilities(y, p)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)  # p = 1 falls in the last bin
    bins = []
    for b in range(n_bins):
        inside = idx == b
        n = int(inside.sum())
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": n,
                     "mean_p": float(p[inside].mean()) if n else float("nan"),
                     "observed": float(y[inside].mean()) if n else float("nan")})
    return bins


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / N)·|observed_b − mean_p_b| over ``reliability_bins``; NaN when empty."""
    bins = reliability_bins(y, p, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["observed"] - b["mean_p"]) for b in bins if b["count"]))
