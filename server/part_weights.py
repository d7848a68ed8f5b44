"""Each part of the model averaged over the sites that trained it.

A mean strategy weights every parameter by a site's num-examples. A hospital with pathology
labels but no drawn masks trains no mask decoder, yet its unchanged decoder would enter the mean
with all its images' weight and hold the federation's masks back (measured: FedAvg over BrEaST
and a labels-only BUSI, three times its size, segmented nothing on BUS-UCLM). So the mask decoder
is weighted by each site's lesion images that taught it a lesion (``n_decoder``: a lesion mask,
or the consistency term routed into the mask) and the classifier head by the images that gave it
a gradient (``n_head``: a label, or the term routed into the classifier); the rest by
num-examples (common.losses.trained_parts). By lesions, not images, so that a site with many
normal images does not outweigh the others' lesions (pooling weighs every lesion image alike);
chosen on the federation's validation Dice held out BUSI (0.611 vs 0.570); held-out Dice +0.034
(BUSI), +0.015 (BUS-UCLM), −0.007 (BrEaST, p 0.72): docs/lab/2026-12-06-decoder-lesion-weights-dp-heads.md.

Each accepted reply's part is moved to g + r·(w − g), r = (c_i / Σc) / (n_i / Σn), so the
strategy's own num-examples mean — FedAvg, FedProx, FedBN, FedAdam's pseudo-gradient — becomes
the c-weighted mean of that part (a convex combination of screened updates; c_i is capped at
n_i, whose screening bounds it); a part no site trained (Σc = 0) keeps the global value. Not
under client-level DP (r > 1 would undo the clipping bound) nor for FedMedian (no weights).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, Message

#: (state-dict key prefix, train-metric count that weights it)
PARTS: tuple[tuple[str, str], ...] = (("backbone.decoder.", "n_decoder"), ("head.", "n_head"))


def part_factors(metrics: Sequence[Mapping[str, float]], count: str) -> list[float] | None:
    """r_i of each site for the part weighted by ``count``; None when the weights already agree."""
    n = [float(m["num-examples"]) for m in metrics]
    c = [min(max(0.0, float(m[count])), ni) for m, ni in zip(metrics, n)]  # a count beyond its examples is a lie
    total_n, total_c = sum(n), sum(c)
    if total_n <= 0 or any(v <= 0 for v in n):
        return None
    if total_c <= 0:
        return [0.0] * len(n)
    r = [(ci / total_c) / (ni / total_n) for ci, ni in zip(c, n)]
    return None if all(abs(v - 1.0) < 1e-12 for v in r) else r


def reweight_parts(replies: Sequence[Message], current: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Rewrite the parts of ``replies`` (accepted, per-tensor arrays) in place as the module
    says, touching only those parts' floating arrays; returns {part prefix: factors} of the
    parts changed (for the log)."""
    metrics = [{k: float(v) for k, v in m.content["metrics"].items()} for m in replies]  # type: ignore[union-attr]
    changed = {prefix: f for prefix, count in PARTS if (f := part_factors(metrics, count)) is not None}
    if not changed:
        return changed
    for i, msg in enumerate(replies):
        arrays = msg.content["arrays"]
        for key in list(arrays.keys()):  # type: ignore[union-attr]
            prefix = next((p for p in changed if key.startswith(p)), None)
            if prefix is None or key not in current:
                continue
            w = arrays[key].numpy()  # type: ignore[index]
            if np.issubdtype(w.dtype, np.floating):
                g = np.asarray(current[key], dtype=w.dtype)
                arrays[key] = Array(np.ascontiguousarray(g + changed[prefix][i] * (w - g), dtype=w.dtype))  # type: ignore[index]
    return changed
