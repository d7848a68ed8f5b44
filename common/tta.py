"""Depth-shift test-time augmentation: look for the lesion again with the near field cut away.

A model trained on one centre whose lesions sit high in a shallow field of view (BrEaST) learns
"dark blob near the top"; on deeper scans it marks a fat lobule under the skin and misses the
lesion below (docs/external_validation.md). Shifting the image up by a fraction of its height
(cutting off the near field, filling the bottom with the darkest value) shows a deep lesion where
the model expects one. The mask is the mean of the probabilities over the views that saw each
pixel: every view sees the bottom rows, only the unshifted ones the top rows. Malignancy comes
from the unshifted views only: it is a whole-image decision and a shifted view has lost the top.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.data.tensors import normalise


def check_shifts(shifts: Sequence[float]) -> tuple[float, ...]:
    """``shifts`` as floats, each a fraction of the height in (0, 1); ValueError otherwise."""
    out = tuple(float(s) for s in shifts)
    if any(not 0.0 < s < 1.0 for s in out):
        raise ValueError(f"DepthShiftTTA: shifts must lie in (0, 1), got {list(out)}")
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


class DepthShiftTTA(nn.Module):
    """(mask logits (B,1,H,W), malignancy logits (B,)) of ``model`` averaged over the image, with
    ``flip`` its mirror, and the image shifted up by each of ``shifts`` (fractions of the height).
    The shifted views are not mirrored: on the external centres (docs/external_validation.md)
    mirrored shifts diluted the unshifted views and cost Dice on BUSI.

    The input is what the model takes (per-image z-scored); the wrapper changes no weight.
    ``keep_plain``: every call also stores the plain (unaugmented) view's probabilities, so
    the plain model is scored from the same pass (``take_plain``) instead of a fifth one."""

    def __init__(self, model: nn.Module, shifts: Sequence[float] = (0.15, 0.3),
                 flip: bool = True, keep_plain: bool = False) -> None:
        super().__init__()
        self.model = model
        self.shifts = check_shifts(shifts)
        self.flip = flip
        self.keep_plain = keep_plain
        self._plain: list[tuple[Tensor, Tensor]] = []

    def take_plain(self) -> tuple[np.ndarray, np.ndarray]:
        """(mask probabilities (N,1,H,W), malignancy probabilities (N,)) float32 of the plain
        view over every call since the last take, in call order; empties the store."""
        if not self._plain:
            raise RuntimeError("DepthShiftTTA.take_plain: nothing stored (keep_plain=False?)")
        probs = torch.cat([p for p, _ in self._plain]).numpy()
        mal = torch.cat([c for _, c in self._plain]).numpy()
        self._plain.clear()
        return probs, mal

    def _probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m, c = self.model(x)
        return torch.sigmoid(m), torch.sigmoid(c.reshape(-1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        total = x.new_zeros(b, 1, h, w)
        count = x.new_zeros(b, 1, h, 1)  # how many views saw each row
        p, c = self._probs(x)
        if self.keep_plain:
            self._plain.append((p.float().cpu(), c.float().cpu()))
        total += p
        count += 1
        cls = [c]
        if self.flip:
            p, c = self._probs(x.flip(-1))
            total += p.flip(-1)
            count += 1
            cls.append(c)
        for rows in (round(s * h) for s in self.shifts):
            p, _ = self._probs(shift_up(x, rows))
            total[..., rows:, :] += p[..., : h - rows, :]
            count[..., rows:, :] += 1
        mask = total / count
        return torch.logit(mask, eps=1e-6), torch.logit(torch.stack(cls).mean(0), eps=1e-6)
