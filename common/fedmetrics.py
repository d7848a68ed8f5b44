"""The fixed metric schemas of the federation's replies and their pooling over sites.

Flower skips aggregation when sites report different metric keys, so every site always reports
exactly these keys, with the sentinel ``UNDEFINED`` instead of NaN (a MetricRecord must never
hold NaN). Framework-free (no flwr, no torch).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

#: Value reported for a metric that is undefined at a site (e.g. AUC with one class present).
UNDEFINED = -1.0


# ---------------------------------------------------------------- fixed metric schemas
#: Keys of every train reply. Losses are means over the last local epoch ("train_loss" is the
#: multi-task total, "proximal" the FedProx term); "epsilon" is the site's cumulative DP-SGD ε
#: over every round so far and "epsilon_round" this round's increase of it (both UNDEFINED when
#: DP is off).
TRAIN_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "n_decoder", "n_head", "train_loss", "seg", "cls", "consistency", "prior_sup",
    "proximal", "steps", "seconds", "epsilon", "epsilon_round",
)
#: Keys of every evaluate reply. Counts make each sentinel interpretable: dice/iou/hd95 are
#: UNDEFINED when n_lesion == 0, sensitivity when n_malignant == 0, specificity when
#: n_images == n_malignant, auc when either class is missing.
EVAL_METRIC_KEYS: tuple[str, ...] = (
    "num-examples", "dice", "iou", "hd95", "auc", "sensitivity", "specificity", "accuracy",
    "n_images", "n_lesion", "n_malignant", "seconds",
)


def finite_or_undefined(value: Any) -> float:
    """float(value), or UNDEFINED for None/NaN/inf (a MetricRecord must never hold NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return UNDEFINED
    return v if math.isfinite(v) else UNDEFINED


def train_metrics(
    num_examples: int, loss: float, parts: Mapping[str, float], steps: int, seconds: float,
    epsilon: float | None = None, epsilon_round: float | None = None,
    n_decoder: int | None = None, n_head: int | None = None,
) -> dict[str, float]:
    """The fixed train-reply schema from one site's local training (epsilon/epsilon_round:
    None when DP is off; n_decoder / n_head: the weights of the mask decoder / the classifier
    head in the mean, common.losses.trained_parts; None: num_examples)."""
    out = {
        "num-examples": float(num_examples),
        "n_decoder": float(num_examples if n_decoder is None else n_decoder),
        "n_head": float(num_examples if n_head is None else n_head),
        "train_loss": finite_or_undefined(loss),
        "steps": float(steps),
        "seconds": float(seconds),
        "epsilon": finite_or_undefined(epsilon),
        "epsilon_round": finite_or_undefined(epsilon_round),
    }
    for key in ("seg", "cls", "consistency", "prior_sup"):
        out[key] = finite_or_undefined(parts.get(key))
    out["proximal"] = finite_or_undefined(parts.get("proximal", 0.0))  # FedProx term, 0 otherwise
    return {k: out[k] for k in TRAIN_METRIC_KEYS}


def eval_metrics(summary: Mapping[str, float], n_malignant: int, seconds: float) -> dict[str, float]:
    """The fixed evaluate-reply schema from an ``EvalResult.summary``."""
    n_images = int(summary.get("n_images", 0))
    out = {k: finite_or_undefined(summary.get(k)) for k in EVAL_METRIC_KEYS}
    out.update(
        {
            "num-examples": float(n_images),
            "n_images": float(n_images),
            "n_lesion": float(int(summary.get("n_lesion", 0))),
            "n_malignant": float(n_malignant),
            "seconds": float(seconds),
        }
    )
    return out


#: Weight of each evaluate metric when pooling sites: the count its per-site value averages over.
_EVAL_WEIGHTS: dict[str, str] = {
    "dice": "n_lesion", "iou": "n_lesion", "hd95": "n_lesion", "auc": "n_images",
    "sensitivity": "n_malignant", "specificity": "n_benign", "accuracy": "n_images",
}


def aggregate_site_metrics(per_site: Mapping[str, Mapping[str, float]], phase: str) -> dict[str, float]:
    """Federation-wide metrics from per-site replies. Evaluate: each metric is weighted by the
    count it is a mean over (dice by n_lesion, sensitivity by n_malignant, ...) skipping
    UNDEFINED sites, which makes dice/sensitivity/specificity/accuracy exactly the pooled
    values; AUC is the image-weighted mean of site AUCs (pooled AUC needs the raw scores).
    Train: losses weighted by num-examples; seconds, epsilon and epsilon_round are the maximum
    over sites (the weakest guarantee of the federation)."""
    sites = list(per_site.values())
    if not sites:
        return {}
    out: dict[str, float] = {}
    if phase == "train":
        for key in TRAIN_METRIC_KEYS:
            vals = [s[key] for s in sites]
            if key in ("num-examples", "n_decoder", "n_head", "steps"):
                out[key] = float(sum(vals))
            elif key in ("seconds", "epsilon", "epsilon_round"):
                out[key] = float(max(vals))
            else:
                out[key] = _weighted([(s[key], s["num-examples"]) for s in sites])
        return out
    for key in EVAL_METRIC_KEYS:
        if key in _EVAL_WEIGHTS:
            out[key] = _weighted([(s[key], _eval_weight(s, _EVAL_WEIGHTS[key])) for s in sites])
        elif key == "seconds":
            out[key] = float(max(s[key] for s in sites))
        else:
            out[key] = float(sum(s[key] for s in sites))
    return out


def _eval_weight(site: Mapping[str, float], count: str) -> float:
    if count == "n_benign":
        return site["n_images"] - site["n_malignant"]
    return site[count]


def _weighted(pairs: list[tuple[float, float]]) -> float:
    """Weighted mean over pairs (value, weight), ignoring UNDEFINED values and zero weights."""
    kept = [(v, w) for v, w in pairs if v != UNDEFINED and w > 0]
    total = sum(w for _, w in kept)
    return float(sum(v * w for v, w in kept) / total) if total > 0 else UNDEFINED
