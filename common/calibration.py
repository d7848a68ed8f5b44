"""Temperature scaling of the malignancy output: p = sigmoid(z / T) with one T > 0 per model,
fitted by minimising the negative log-likelihood (NLL) of the labels.

Federated form: NLL(T) summed over images is additive over sites, so each site reports only its
summed NLL on a fixed grid of temperatures (``GRID``: 61 points log-spaced over 0.25..8, T = 1
among them) and its image count (``GridStats``); the server adds them (``merge``) and takes the
grid argmin, refined by a parabola in log T through it and its two neighbours
(``fit_temperature``). Nothing per image leaves a site, and one site's stats merged with
another's give exactly the fit of the pooled data. The simulation uses the same code, with its
pooled training centres as one "site".

Which images: the training sites' validation split, so only a run that keeps one
(``data.val_fraction`` > 0, ``calibrates``) is calibrated; otherwise T stays 1 and the model card
says so. Fitted on the training images themselves (the recommended preset keeps none aside), T
came out below 1 and left the external centres' ECE the same or worse in every unit measured
(RESULTS.md §4), so that fit is not made. T only rescales the logit, so the AUC and every decision at
threshold 0.5 are unchanged; probabilities (Brier, ECE, a threshold other than 0.5) change.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common import metrics
from common.config import DataConfig, ExperimentConfig, InferenceConfig
from common.data.tensors import TensorData, normalise
from common.device import resolve_device

log = logging.getLogger(__name__)

#: The temperatures every site evaluates: 2^(k/12 − 2), k = 0..60 (0.25 … 8; T = 1 at k = 24).
GRID: np.ndarray = 2.0 ** np.linspace(-2.0, 3.0, 61)
#: Fewer images than this in all sites together: T stays 1 (too few to fit a temperature).
MIN_COUNT = 20
#: Clamp of probabilities before their logit (as ``common.inference`` clamps averaged ones).
_EPS = 1e-6
#: The query action a federation's server sends once after its last round ("query.calibrate").
CALIBRATE = "calibrate"


class CalibrationError(ValueError):
    """Grid statistics that cannot be used (wrong length, non-finite, negative, count too big)."""


@dataclass(frozen=True)
class GridStats:
    """One site's (or several sites' merged) sufficient statistics: ``nll`` (len(GRID),) the
    summed NLL at each grid temperature, ``count`` the images summed."""

    nll: tuple[float, ...]
    count: int

    def __post_init__(self) -> None:
        if len(self.nll) != len(GRID):
            raise CalibrationError(f"calibration: {len(self.nll)} NLL values, expected {len(GRID)}")
        if not all(isinstance(v, float) and math.isfinite(v) and v >= 0.0 for v in self.nll):
            raise CalibrationError("calibration: NLL values must be finite and >= 0")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise CalibrationError(f"calibration: count must be an integer >= 0, got {self.count!r}")
        if self.count == 0 and any(self.nll):
            raise CalibrationError("calibration: NLL sums without images")

    def mean_nll(self, index: int) -> float:
        """Mean NLL per image at ``GRID[index]`` (NaN without images)."""
        return self.nll[index] / self.count if self.count else float("nan")


def empty_stats() -> GridStats:
    return GridStats(tuple(0.0 for _ in GRID), 0)


def grid_nll(logits: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> GridStats:
    """Summed NLL of ``labels`` (N,) 0/1 under sigmoid(``logits`` (N,) / T) at every T of
    ``GRID``; pairs with a non-finite value are left out (and not counted)."""
    z, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and labels {y.shape} differ in shape")
    keep = np.isfinite(z) & np.isfinite(y)
    sign = np.where(y[keep] > 0.5, 1.0, -1.0)
    # −log sigmoid(s·z/T) = log(1 + exp(−s·z/T)), stable for any |z|
    nll = np.logaddexp(0.0, -(sign * z[keep])[:, None] / GRID[None, :]).sum(0)
    return GridStats(tuple(float(v) for v in nll), int(keep.sum()))


def merge(stats: Iterable[GridStats]) -> GridStats:
    """The statistics of all of ``stats`` together (sums)."""
    total, count = np.zeros(len(GRID)), 0
    for s in stats:
        total += np.asarray(s.nll)
        count += s.count
    return GridStats(tuple(float(v) for v in total), count)


def best_index(stats: GridStats) -> int:
    """The grid index of the smallest summed NLL (ties: the one nearest T = 1)."""
    nll = np.asarray(stats.nll)
    ties = np.flatnonzero(nll == nll.min())
    return int(ties[np.argmin(np.abs(np.log(GRID[ties])))])


def fit_temperature(stats: GridStats, min_count: int = MIN_COUNT) -> float:
    """T minimising the summed NLL: the grid argmin, refined by the vertex of the parabola in
    log T through it and its neighbours (kept within half a grid step). 1.0 with fewer than
    ``min_count`` images."""
    if stats.count < max(min_count, 1):
        log.info("calibration: %d image(s), fewer than %d: temperature left at 1", stats.count, min_count)
        return 1.0
    k = best_index(stats)
    if k in (0, len(GRID) - 1):
        log.warning("calibration: the best temperature %.3g lies at the end of the grid", GRID[k])
        return float(GRID[k])
    f0, f1, f2 = stats.nll[k - 1], stats.nll[k], stats.nll[k + 1]
    step = math.log(GRID[1] / GRID[0])
    curve = f0 - 2.0 * f1 + f2
    shift = 0.0 if curve <= 0 else min(max(0.5 * step * (f0 - f2) / curve, -step / 2), step / 2)
    return float(GRID[k] * math.exp(shift))


def fit(logits: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
        min_count: int = MIN_COUNT) -> float:
    """``fit_temperature`` of one data set's logits (N,) and 0/1 labels (N,)."""
    return fit_temperature(grid_nll(logits, labels), min_count)


def apply_temperature(p: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T) of probabilities ``p`` (float64; p clamped to [1e-6, 1 − 1e-6]
    first): what a model with temperature T outputs where the same model with T = 1 gave p."""
    q = np.clip(np.asarray(p, np.float64), _EPS, 1.0 - _EPS)
    return 1.0 / (1.0 + np.exp(-np.log(q / (1.0 - q)) / float(temperature)))


def check_temperature(value: Any, where: str = "temperature") -> float:
    """``value`` as a finite float > 0; CalibrationError naming ``where`` otherwise."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{where}: not a number: {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(t) or t <= 0:
        raise CalibrationError(f"{where}: must be a finite number > 0, got {value!r}")
    return t


# ------------------------------------------------------------------ the data and the model
def calibrates(data: DataConfig) -> bool:
    """Whether a run is calibrated: only on held-out validation images (module docstring)."""
    return data.val_fraction > 0


def split_name(data: DataConfig) -> str:
    """"validation" when the run has a validation split (``val_fraction`` > 0), else "training":
    the split every site fits on (``calibration_split``)."""
    return "validation" if data.val_fraction > 0 else "training"


def calibration_split(train: TensorData, val: TensorData, data: DataConfig) -> tuple[TensorData, str]:
    """(images to fit on, ``split_name``): the validation split when the run has one
    (``val_fraction`` > 0, even where a small site's is empty: every site fits on the same kind
    of split), else the training split."""
    name = split_name(data)
    return (val if name == "validation" else train), name


@torch.no_grad()
def malignancy_logits(predictor: nn.Module, data: TensorData, batch_size: int = 32,
                      device: str | torch.device | None = None) -> np.ndarray:
    """Malignancy logits (N,) float64 of ``predictor`` (any network of the (mask, cls) output
    contract, e.g. ``common.inference.build_predictor``) on ``data``'s raw images, in order."""
    dev = resolve_device(device) if device is not None else next(predictor.parameters()).device
    predictor.to(dev)
    was_training = predictor.training
    predictor.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            _, cls = predictor(normalise(data.images[start:start + batch_size].to(dev)))
            out.append(cls.reshape(-1).double().cpu())
    finally:
        predictor.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def model_stats(model: nn.Module, data: TensorData, cfg: InferenceConfig, batch_size: int = 32,
                device: str | torch.device | None = None) -> GridStats:
    """``grid_nll`` of ``model`` (one network, predicted with ``cfg``'s views at T = 1) on
    ``data``: what a site reports. Malignant (1) vs benign or normal (0)."""
    from common.inference import build_predictor

    if len(data) == 0:
        return empty_stats()
    predictor = build_predictor([model], cfg)
    z = malignancy_logits(predictor, data, batch_size, device)
    return grid_nll(z, data.malignant.double().numpy())


def site_stats(model: nn.Module, experiment: ExperimentConfig, train: TensorData, val: TensorData,
               device: str | torch.device | None = None) -> tuple[GridStats, str]:
    """(``model_stats`` of ``model`` (``experiment``'s network with the final weights) on the
    site's ``calibration_split``, that split's name): a federated site's answer to the server."""
    data, split = calibration_split(train, val, experiment.data)
    return model_stats(model, data, experiment.inference, experiment.train.batch_size, device), split


# ------------------------------------------------------------------ messages and reports
def to_record(stats: GridStats) -> dict[str, Any]:
    """The statistics as a flat record of numbers (a Flower MetricRecord's content)."""
    return {"nll": [float(v) for v in stats.nll], "count": int(stats.count)}


def from_record(record: Mapping[str, Any], max_count: int | None = None) -> GridStats:
    """The statistics a site sent, checked: the grid's length, finite NLL sums >= 0, an integer
    count in [0, ``max_count``] (the site's declared number of training images); a reply that
    is not raises CalibrationError."""
    nll, count = record.get("nll"), record.get("count")
    if not isinstance(nll, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in nll):
        raise CalibrationError("calibration: 'nll' is not a list of numbers")
    stats = GridStats(tuple(float(v) for v in nll), count)  # type: ignore[arg-type]
    if max_count is not None and stats.count > max_count:
        raise CalibrationError(f"calibration: {stats.count} images, more than the {max_count} declared")
    return stats


def summary(stats: GridStats, temperature: float, split: str, centres: Mapping[str, int]) -> dict[str, Any]:
    """What the model file and its card keep about the fit: T, the split and the centres'
    counts, whether there were enough images to fit (``fitted``), the mean NLL at T = 1 and at
    the grid point nearest T."""
    at_one = int(np.argmin(np.abs(np.log(GRID))))
    near = int(np.argmin(np.abs(np.log(GRID / temperature))))
    return {"method": "temperature scaling (NLL on a 61-point log grid, 0.25-8, parabola-refined)",
            "temperature": float(temperature), "split": split, "centres": dict(centres),
            "n": int(stats.count), "fitted": stats.count >= MIN_COUNT,
            "nll_before": stats.mean_nll(at_one), "nll_after": stats.mean_nll(near)}


def before_after(y: Sequence[float] | np.ndarray, p_raw: Sequence[float] | np.ndarray,
                 p_cal: Sequence[float] | np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """ECE (``n_bins`` equal-width bins) and Brier score of the uncalibrated (``*_raw``) and the
    calibrated probabilities against 0/1 labels ``y`` (``common.metrics``)."""
    return {"ece_raw": metrics.expected_calibration_error(y, p_raw, n_bins),
            "ece": metrics.expected_calibration_error(y, p_cal, n_bins),
            "brier_raw": metrics.brier_score(y, p_raw), "brier": metrics.brier_score(y, p_cal)}
