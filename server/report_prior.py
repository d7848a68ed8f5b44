"""The deployment report's section "what this model learned about malignancy": the BI-RADS prior
φ = sigmoid(Σ w_k·z_k + b) of the global model and of each site's accepted update, per round,
from the ``prior`` rows of metrics.csv (written by server/prior_rows.py in the ServerApp).

Metric names per feature f (``BiradsPrior.describe()``): ``weight_f`` (logit change per standard
deviation of the feature), ``per_unit_f`` (per clinical unit of the feature: weight / SD),
``mean_f`` and ``std_f`` (the standardisation), plus ``bias`` (logit at the mean features) and
``bias_per_unit`` (logit with every feature 0). Values are read as stored: a prior value may be
−1.0, which the other phases use as their UNDEFINED sentinel. Light on purpose (the coordinator
renders it): no torch, numpy or pandas.
"""
from __future__ import annotations

import math
from typing import Sequence

from common.federation import AGGREGATE_SITE
from server.run_metrics import RunMetrics

PRIOR_PHASE = "prior"
PRIOR_PLOT = "report_prior.png"

#: The clinical unit of each BI-RADS feature (common/birads.py), for the report.
FEATURE_UNITS: dict[str, str] = {
    "area": "√(lesion area / image area)",
    "compactness": "perimeter² / (4π·area); 1 = disc",
    "roughness": "share of the outline at fine scales",
    "texture": "intensity SD inside, in background SDs",
    "orientation": "log(height / width); > 0 taller than wide",
    "margin_sharpness": "edge contrast per 1/128 of the image side",
    "posterior": "shadowing depth, in background SDs",
}


def prior_values(m: RunMetrics, rnd: int, site: str = AGGREGATE_SITE) -> dict[str, float]:
    """The ``prior`` rows of one round and site (empty when none)."""
    return dict(m.values.get((rnd, PRIOR_PHASE, site), {}))


def prior_features(values: dict[str, float]) -> list[str]:
    """Feature names present in one round's prior rows, in recorded order."""
    return [k[len("weight_"):] for k in values if k.startswith("weight_")]


def prior_rounds(m: RunMetrics, site: str = AGGREGATE_SITE) -> list[int]:
    return [r for r in m.rounds if prior_values(m, r, site)]


def prior_series(m: RunMetrics) -> list[tuple[str, list[int], list[float], bool]]:
    """One line per feature: the global prior's weight per SD over the rounds (for the plot)."""
    rounds = prior_rounds(m)
    if not rounds:
        return []
    names = prior_features(prior_values(m, rounds[-1]))
    out = []
    for name in names:
        pts = [(r, prior_values(m, r).get(f"weight_{name}")) for r in rounds]
        kept = [(r, v) for r, v in pts if v is not None and math.isfinite(v)]
        out.append((name, [r for r, _ in kept], [v for _, v in kept], False))
    return out


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+.{digits}f}"


def _g(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _sigmoid(x: float) -> float:
    """sigmoid(x) without overflow for any finite x (a diverged prior's bias may be huge)."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _reading(name: str, w: float | None) -> str:
    if w is None or not math.isfinite(w):
        return "not learned"
    verb = "raises" if w > 0 else "lowers"
    return f"higher {name.replace('_', ' ')} {verb} the malignancy prior"


def prior_section(m: RunMetrics, plot: str | None = None) -> list[str]:
    """Markdown lines of the section ([] when the run recorded no prior rows)."""
    rounds = prior_rounds(m)
    if not rounds:
        return []
    last = rounds[-1]
    final = prior_values(m, last)
    names = prior_features(final)
    lines = ["## What this model learned about malignancy", "",
             f"The BI-RADS prior φ = sigmoid(Σ w·z + b) of the global model after round {last}: z is "
             "each feature of the predicted mask standardised with the training mean and SD below. "
             "*Per SD*: change of the malignancy logit for one SD more of the feature (comparable "
             "across features); *per unit*: the same per clinical unit of the feature (per SD / SD).",
             ""]
    rows = [[n, FEATURE_UNITS.get(n, "–"), _f(final.get(f"weight_{n}")), _f(final.get(f"per_unit_{n}")),
             _g(final.get(f"mean_{n}")), _g(final.get(f"std_{n}")), _reading(n, final.get(f"weight_{n}"))]
            for n in sorted(names, key=lambda n: -abs(final.get(f"weight_{n}", 0.0)))]
    lines += _table(["feature", "unit", "per SD", "per unit", "training mean", "SD", "reading"], rows)
    bias = final.get("bias")
    if bias is not None and math.isfinite(bias):
        lines += ["", f"Intercept: logit {bias:+.3f} at the mean features (φ = "
                      f"{_sigmoid(bias):.3f}); {_f(final.get('bias_per_unit'))} with every "
                      "feature at 0."]
    if len(rounds) > 1:
        lines += ["", "Global prior weight per SD, per round:", ""]
        lines += _table(["round", *names], [[str(r), *(_f(prior_values(m, r).get(f"weight_{n}")) for n in names)]
                                            for r in rounds])
    sites = [s for s in m.sites(phase=PRIOR_PHASE) if prior_values(m, last, s)]
    if sites:
        lines += ["", f"Each site's update in round {last} (its prior after local training, read from "
                      "the weights it returned; weight per SD):", ""]
        lines += _table(["site", *names], [[s, *(_f(prior_values(m, last, s).get(f"weight_{n}")) for n in names)]
                                           for s in sites])
    if plot:
        lines += ["", f"![global prior weights per round]({plot})"]
    return lines + [""]
