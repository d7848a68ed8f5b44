"""Clipping one site's update to an L2 norm, for client-level DP (server/dp.py at the server,
client/client_dp.py at the site), framework-free.

Flower 1.41's own clipping (``compute_clip_model_update``) pairs update and weights by position
and scales each array in place, which leaves 0-d arrays unclipped (``np.subtract`` of two 0-d
arrays is a NumPy scalar, and ``*=`` on it rebinds a name) and divides by a zero norm. Here arrays
are paired by name, 0-d arrays are clipped like any other, and a zero update stays zero.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def is_counter(key: str) -> bool:
    """A step counter (the prior's ``num_updates``): it grows by the local steps of every round,
    says nothing about an image, and would otherwise take most of the clipping norm."""
    return key.endswith("num_updates")


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """||weights − reference||₂ over every array but counters (float64); inf/NaN when not finite."""
    return math.sqrt(sum(float(np.square(np.asarray(weights[k], np.float64) - np.asarray(reference[k], np.float64)).sum())
                         for k in reference if not is_counter(k)))


def clip_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[dict[str, np.ndarray], float] | None:
    """(``reference + u·min(1, C/||u||)`` with u = weights − reference, in ``weights``' key order
    and dtypes, and ||u||); None when ``weights`` cannot be clipped against ``reference`` (other
    names or shapes, a non-finite update)."""
    if set(weights) != set(reference) or any(np.shape(weights[k]) != np.shape(reference[k]) for k in weights):
        return None
    norm = update_norm(weights, reference)
    if not math.isfinite(norm):
        return None
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = {}
    for k, w in weights.items():
        if is_counter(k):  # passed as sent: not part of the bounded update
            out[k] = np.asarray(w, order="C")
            continue
        ref = np.asarray(reference[k], np.float64)
        u = np.asarray(w, np.float64) - ref
        out[k] = np.asarray(ref + u * scale, dtype=np.asarray(w).dtype, order="C")
    return out, norm
