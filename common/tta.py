"""Test-time views: the horizontal mirror and depth shifts, merged into one prediction.

A model trained on one centre whose lesions sit high in a shallow field of view (BrEaST) learns
"dark blob near the top"; on deeper scans it marks a fat lobule under the skin and misses the
lesion below. Shifting the image up by a fraction of its height (cutting off the near field,
filling the bottom with the darkest value) shows a deep lesion where the model expects one. The
mask is the mean of the probabilities over the views that saw each pixel: every view sees the
bottom rows, only the unshifted ones the top rows. Malignancy comes from the unshifted views
only: it is a whole-image decision and a shifted view has lost the top. The shifted views are
not mirrored: mirrored shifts diluted the unshifted views and cost Dice on the external centres.

``common.inference`` assembles these views with the ensemble and the post-processing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from common.data.tensors import normalise

#: (mask probabilities (B,1,H,W), malignancy probabilities (B,)) of a normalised batch.
ProbsFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def check_shifts(shifts: Sequence[float]) -> tuple[float, ...]:
    """``shifts`` as floats, each a fraction of the height in (0, 1); ValueError otherwise."""
    out = tuple(float(s) for s in shifts)
    if any(not 0.0 < s < 1.0 for s in out):
        raise ValueError(f"depth shifts must lie in (0, 1), got {list(out)}")
    return out


def shift_up(x: Tensor, rows: int) -> Tensor:
    """x (B,C,H,W) moved up by ``rows``; the bottom ``rows`` take each image's minimum (the dark
    far field), then the per-image z-score is redone, as the model's input always is."""
    if rows <= 0:
        return x
    if rows >= x.shape[-2]:
        raise ValueError(f"shift_up: {rows} rows of an image {x.shape[-2]} high")
    fill = x.amin(dim=(-2, -1), keepdim=True).expand_as(x)
    shifted = torch.cat([x[..., rows:, :], fill[..., : rows, :]], dim=-2)
    return normalise(shifted)


def view_probs(probs: ProbsFn, x: Tensor, flip: bool, shifts: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(mask probabilities (B,1,H,W), malignancy probabilities (B,)) of ``probs`` averaged over
    x, with ``flip`` its mirror (mapped back), and x shifted up by each of ``shifts`` (fractions
    of the height; each mask row averages only the views that saw it). x is normalised."""
    b, _, h, w = x.shape
    total = x.new_zeros(b, 1, h, w)
    count = x.new_zeros(b, 1, h, 1)  # how many views saw each row
    p, c = probs(x)
    total += p
    count += 1
    cls = [c]
    if flip:
        p, c = probs(x.flip(-1))
        total += p.flip(-1)
        count += 1
        cls.append(c)
    for rows in (round(s * int(h)) for s in check_shifts(shifts)):  # int: h is a tensor when traced (ONNX export)
        p, _ = probs(shift_up(x, rows))
        total[..., rows:, :] += p[..., : h - rows, :]
        count[..., rows:, :] += 1
    return total / count, torch.stack(cls).mean(0)
