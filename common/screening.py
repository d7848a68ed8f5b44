"""Screening of site updates before aggregation: framework-free checks on dicts of NumPy arrays.

A hostile or broken site can send weights that are NaN, shaped wrongly, absurdly large, or claim
more training images than it has (FedAvg weights each update by that claim). One such update
poisons the average, so every update is screened first; server/screening.py applies the verdict.

Checks per update, in this order (a failed schema or finiteness check ends the update's checks:
the later ones cannot be computed on it):
1. ``schema``: array names, shapes and dtypes exactly those of the global model sent;
2. ``non-finite``: no NaN or inf anywhere;
3. ``num-examples``: a positive integer no larger than the ``num-train`` the site declared when
   it joined. An inflated count is *rejected*, not clipped: it is a false statement, and a
   clipped liar would still get the largest weight it could claim;
4. ``norm``: ||w_site − w_global||₂ ≤ factor × the round's median update norm (the lower median
   of the updates that passed 1-3, so with two sites the larger update is held to the smaller);
   ``norm-cap``: ≤ the absolute cap, when one is set.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.clipping import is_counter

Arrays = Mapping[str, np.ndarray]

#: Reason codes, in check order (metric rows "rejected_<code>" name them).
CHECKS: tuple[str, ...] = ("schema", "non-finite", "num-examples", "norm", "norm-cap")


@dataclass(frozen=True)
class ScreenLimits:
    """``norm_factor``: bound on an update's norm relative to the round's median update norm;
    ``norm_cap``: absolute bound on it (None: only the relative one)."""

    norm_factor: float = 10.0
    norm_cap: float | None = None


@dataclass(frozen=True)
class Update:
    """One site's train reply: per-tensor weights, its claimed ``num-examples`` and the
    ``num-train`` it declared when joining (None: not known, the count is then not capped)."""

    arrays: Arrays
    num_examples: float
    declared: int | None = None


@dataclass(frozen=True)
class Verdict:
    """``accepted`` sites in name order; ``rejected`` {site: ((code, text), ...)}; ``norms`` the
    update norms that could be computed; ``bound`` the relative norm bound (None: no clean update)."""

    accepted: tuple[str, ...]
    rejected: dict[str, tuple[tuple[str, str], ...]]
    norms: dict[str, float] = field(default_factory=dict)
    bound: float | None = None

    def reason(self, site: str) -> str:
        """The rejection reasons of ``site`` as one line."""
        return "; ".join(text for _code, text in self.rejected.get(site, ()))


def schema_problem(arrays: Arrays, reference: Arrays) -> str:
    """'' when ``arrays`` has exactly the names, shapes and dtypes of ``reference``; else why not."""
    got, want = set(arrays), set(reference)
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return (f"array names differ from the model's: {len(extra)} unexpected {extra[:3]}, "
                f"{len(missing)} missing {missing[:3]}")
    for key in sorted(want):
        a, r = np.asarray(arrays[key]), np.asarray(reference[key])
        if a.shape != r.shape:
            return f"{key}: shape {a.shape}, the model's is {r.shape}"
        if a.dtype != r.dtype:
            return f"{key}: dtype {a.dtype}, the model's is {r.dtype}"
    return ""


def nonfinite_keys(arrays: Arrays) -> list[str]:
    """Names of the arrays holding NaN or inf (integer and bool arrays are always finite)."""
    return [k for k in sorted(arrays)
            if np.asarray(arrays[k]).dtype.kind in "fc" and not bool(np.isfinite(arrays[k]).all())]


def count_problem(num_examples: float, declared: int | None) -> str:
    """'' when ``num_examples`` is a positive integer not above ``declared`` (None: any positive
    integer); else why not."""
    if not (math.isfinite(num_examples) and num_examples >= 1 and float(num_examples).is_integer()):
        return f"num-examples {num_examples!r} is not a positive integer"
    if declared is not None and num_examples > declared:
        return f"num-examples {int(num_examples)} exceeds the {declared} training images declared when joining"
    return ""


def update_norm(arrays: Arrays, reference: Arrays) -> float:
    """||arrays − reference||₂ over all arrays but step counters (a site with more data takes
    more steps: its counter alone would look like an outlier), in float64 (squares of float32
    weights cannot overflow it); both must share names and shapes."""
    total = 0.0
    for key, ref in reference.items():
        if is_counter(key):
            continue
        diff = np.asarray(arrays[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def lower_median(values: Iterable[float]) -> float:
    """The median for an odd count, the smaller middle value for an even one (one outlier of
    two cannot pull the bound up to itself)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    return ordered[(len(ordered) - 1) // 2]


def screen_updates(updates: Mapping[str, Update], reference: Arrays, limits: ScreenLimits) -> Verdict:
    """Screen one round's updates against the global weights ``reference`` sent that round."""
    reasons: dict[str, list[tuple[str, str]]] = {s: [] for s in updates}
    norms: dict[str, float] = {}
    for site, up in updates.items():
        problem = schema_problem(up.arrays, reference)
        if problem:
            reasons[site].append(("schema", problem))
            continue
        bad = nonfinite_keys(up.arrays)
        if bad:
            reasons[site].append(("non-finite", f"non-finite values in {len(bad)} array(s), e.g. {bad[:3]}"))
            continue
        problem = count_problem(up.num_examples, up.declared)
        if problem:
            reasons[site].append(("num-examples", problem))
        norms[site] = update_norm(up.arrays, reference)
    clean = [norms[s] for s in norms if not reasons[s]]
    bound = limits.norm_factor * lower_median(clean) if clean else None
    for site, norm in norms.items():
        if bound is not None and norm > bound:
            reasons[site].append(("norm", f"update norm {norm:.4g} exceeds {limits.norm_factor:g} × the "
                                          f"round's median {bound / limits.norm_factor:.4g}"))
        if limits.norm_cap is not None and norm > limits.norm_cap:
            reasons[site].append(("norm-cap", f"update norm {norm:.4g} exceeds the cap {limits.norm_cap:g}"))
    accepted = tuple(sorted(s for s in updates if not reasons[s]))
    rejected = {s: tuple(r) for s, r in sorted(reasons.items()) if r}
    return Verdict(accepted, rejected, norms, bound)


class RejectionStreaks:
    """Rounds in a row each site's update was rejected; a site reaching ``drop_after`` is to be
    dropped. An accepted update resets the count; a round a site missed (failure, not asked)
    leaves it unchanged."""

    def __init__(self, drop_after: int) -> None:
        if drop_after < 1:
            raise ValueError(f"drop_after must be >= 1, got {drop_after}")
        self.drop_after = drop_after
        self.counts: dict[str, int] = {}

    def update(self, accepted: Iterable[str], rejected: Iterable[str]) -> list[str]:
        """Record a round's outcome; returns the sites that reach ``drop_after`` now, sorted."""
        for site in accepted:
            self.counts.pop(site, None)
        reached = []
        for site in sorted(rejected):
            self.counts[site] = self.counts.get(site, 0) + 1
            if self.counts[site] == self.drop_after:
                reached.append(site)
        return reached

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {str(k): int(v) for k, v in dict(state.get("counts", {})).items()}
