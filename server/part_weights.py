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

FedNova (Wang et al. 2020) also divides each site's update by its local steps τ_i and rescales by
the weights' mean step count, Δ = Σ q_i·(τ̄/τ_i)·Δ_i with τ̄ = Σ q_i·τ_i, for every floating
parameter (buffers keep the mean): FedAvg's mean lets a site that took more steps — BUS-UCLM's
679 images against BrEaST's 256 — pull the model further than its share of the data. τ_i is
counted by the server from the screened num-examples and the run's batch size, never taken from
the reply, and τ̄/τ_i is capped at ``MAX_STEP_FACTOR`` so a site of a few images cannot amplify
its update past 4× its weight. Chosen on the federation's validation Dice held out BUSI (0.656
vs 0.611): docs/lab/2026-12-07-fednova.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, Message

#: (state-dict key prefix, train-metric count that weights it)
PARTS: tuple[tuple[str, str], ...] = (("backbone.decoder.", "n_decoder"), ("head.", "n_head"))
#: FedNova's bound on τ̄/τ_i: the most one site's update is amplified relative to its weight
MAX_STEP_FACTOR = 4.0


def _counts(metrics: Sequence[Mapping[str, float]], count: str | None) -> tuple[list[float], list[float]]:
    """(num-examples n_i, the part's count c_i) of each site, c_i within [0, n_i] (a count beyond
    its examples is a lie); ``count`` None: c_i = n_i."""
    n = [max(0.0, float(m["num-examples"])) for m in metrics]
    c = n if count is None else [min(max(0.0, float(m[count])), ni) for m, ni in zip(metrics, n)]
    return n, c


def part_factors(metrics: Sequence[Mapping[str, float]], count: str) -> list[float] | None:
    """r_i of each site for the part weighted by ``count``; None when the weights already agree."""
    n, c = _counts(metrics, count)
    total_n, total_c = sum(n), sum(c)
    if total_n <= 0 or any(v <= 0 for v in n):
        return None
    if total_c <= 0:
        return [0.0] * len(n)
    r = [(ci / total_c) / (ni / total_n) for ci, ni in zip(c, n)]
    return None if all(abs(v - 1.0) < 1e-12 for v in r) else r


def step_factors(metrics: Sequence[Mapping[str, float]], count: str | None, batch_size: int) -> list[float]:
    """FedNova's τ̄/τ_i of each site for the part weighted by ``count`` (None: num-examples), with
    τ_i = ⌈n_i / batch_size⌉ steps per local epoch (the epochs cancel), capped at MAX_STEP_FACTOR."""
    n, c = _counts(metrics, count)
    tau = [float(math.ceil(ni / batch_size)) for ni in n]
    if sum(c) <= 0:
        return [1.0] * len(n)
    mean_tau = sum(ci * ti for ci, ti in zip(c, tau)) / sum(c)
    return [min(mean_tau / ti, MAX_STEP_FACTOR) if ti > 0 else 0.0 for ti in tau]


def reweight_parts(replies: Sequence[Message], current: Mapping[str, np.ndarray], *,
                   batch_size: int | None = None, buffers: frozenset[str] = frozenset()) -> dict[str, list[float]]:
    """Rewrite the updates of ``replies`` (accepted, per-tensor arrays) in place as the module
    says, touching only floating arrays; ``batch_size`` None: no step normalisation (every mean
    strategy but FedNova), which leaves ``buffers`` (statistics) to the parts' weights. Returns
    {part prefix ('' for the rest): factors} of the parts changed (for the log)."""
    metrics = [{k: float(v) for k, v in m.content["metrics"].items()} for m in replies]  # type: ignore[union-attr]
    parts = {prefix: f for prefix, count in PARTS if (f := part_factors(metrics, count)) is not None}
    steps = {} if batch_size is None else {
        prefix: step_factors(metrics, count, batch_size) for prefix, count in (*PARTS, ("", None))}
    if not parts and not steps:
        return {}
    ones = [1.0] * len(replies)
    for i, msg in enumerate(replies):
        arrays = msg.content["arrays"]
        for key in list(arrays.keys()):  # type: ignore[union-attr]
            if key not in current:
                continue
            prefix = next((p for p, _ in PARTS if key.startswith(p)), "")
            factor = parts.get(prefix, ones)[i] * (1.0 if key in buffers else steps.get(prefix, ones)[i])
            w = arrays[key].numpy()  # type: ignore[index]
            if factor != 1.0 and np.issubdtype(w.dtype, np.floating):
                g = np.asarray(current[key], dtype=w.dtype)
                arrays[key] = Array(np.ascontiguousarray(g + factor * (w - g), dtype=w.dtype))  # type: ignore[index]
    return {p: [a * b for a, b in zip(parts.get(p, ones), steps.get(p, ones))] for p in {*parts, *steps}}
