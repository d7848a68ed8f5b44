"""Partial annotations for experiments: hide masks (or labels) of a seeded share of a training split.

Hospitals hold many pathology labels and few drawn masks; ``hide_annotations`` turns a fully
annotated training split into that setting (``data.mask_fraction``, ``data.label_fraction``),
whole patients at a time (``splits.patient_groups``: a patient's images and duplicate images
share one fate), deterministic in ``data.seed``. Rules:

- ``mask_fraction``: share of the *lesion* images (benign or malignant, label known) that keep
  their mask. A normal image keeps its empty mask: its label already says there is no lesion.
- ``label_fraction``: share of the labelled images that keep their label. An image never loses
  both: labels are hidden only where the mask is kept, so a fraction below what that allows is
  met as closely as it can be (a warning says so).
- A hidden mask is stored all False with ``has_mask=False`` (the lesion flag then comes from the
  label); a hidden label becomes a placeholder (NORMAL for an empty mask, else BENIGN) with
  ``has_label=False``. The loss reads neither.
Groups are taken in a seeded random order, each whole, while that brings the count closer to
its target; validation and test splits are never touched (they score the model).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from common.data.splits import patient_groups
from common.records import Case, Label

log = logging.getLogger(__name__)


def _pick(counts: Sequence[int], order: Sequence[int], target: int) -> set[int]:
    """Groups (indices into ``counts``) taken in ``order`` while each brings Σ counts closer to
    ``target`` (a group of count 0 is never taken)."""
    chosen: set[int] = set()
    total = 0
    for g in order:
        n = counts[g]
        if n and abs(total + n - target) < abs(total - target):
            chosen.add(g)
            total += n
    return chosen


def hide_annotations(cases: Sequence[Case], mask_fraction: float = 1.0, label_fraction: float = 1.0,
                     seed: int = 0) -> list[Case]:
    """``cases`` with masks / labels hidden as the module docstring says (same order; the
    input cases are not modified). Fractions of 1 return the cases unchanged."""
    for name, v in (("mask_fraction", mask_fraction), ("label_fraction", label_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"data.{name} must lie in [0, 1], got {v}")
    cases = list(cases)
    if (mask_fraction == 1.0 and label_fraction == 1.0) or not cases:
        return cases
    groups = patient_groups(cases)
    rng = np.random.default_rng([seed, 0x6D61736B])  # its own stream: the split's draw is unchanged
    order = rng.permutation(len(groups)).tolist()
    out = list(cases)

    lesion = [c.has_mask and c.has_label and c.label != Label.NORMAL for c in cases]
    counts = [sum(lesion[i] for i in g) for g in groups]
    if mask_fraction < 1.0:
        target_hide = sum(counts) - round(mask_fraction * sum(counts))
        for g in _pick(counts, order, target_hide):
            for i in groups[g]:
                if lesion[i]:
                    out[i] = dataclasses.replace(out[i], mask=np.zeros_like(out[i].mask),
                                                 has_mask=False)

    if label_fraction < 1.0:
        labelled = sum(c.has_label for c in out)
        target_hide = labelled - round(label_fraction * labelled)
        hideable = [[i for i in g if out[i].has_label and out[i].has_mask] for g in groups]
        order2 = rng.permutation(len(groups)).tolist()
        picked = _pick([len(h) for h in hideable], order2, target_hide)
        for g in picked:
            for i in hideable[g]:
                placeholder = Label.BENIGN if out[i].mask.any() else Label.NORMAL
                out[i] = dataclasses.replace(out[i], label=placeholder, has_label=False)
        hidden = sum(len(hideable[g]) for g in picked)
        if hidden < target_hide and hidden == sum(len(h) for h in hideable):
            log.warning("data.label_fraction=%s: only %d of %d labels can be hidden (an image "
                        "without a mask keeps its label)", label_fraction, hidden, target_hide)
    log.info("partial annotations: %d images, %d with mask, %d with label", len(out),
             sum(c.has_mask for c in out), sum(c.has_label for c in out))
    return out
