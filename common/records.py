"""The one record type every centre reader produces and everything downstream consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Mapping

import numpy as np


class Label(IntEnum):
    BENIGN = 0
    MALIGNANT = 1
    NORMAL = 2

    @classmethod
    def parse(cls, text: str) -> "Label":
        """'Benign', 'malignant ', 'NORMAL' → Label; raises ValueError on anything else."""
        key = str(text).strip().upper()
        if key not in cls.__members__:
            raise ValueError(f"unknown label {text!r} (expected benign, malignant or normal)")
        return cls[key]


class DataError(ValueError):
    """Malformed input. The message always names the offending file (and row where relevant)."""


@dataclass(frozen=True, eq=False)
class Case:
    """One ultrasound image with its (merged) lesion mask, at the resolution it was read.

    image: (H, W) uint8 grey. mask: (H, W) bool, all False for normal images.
    spacing_mm: mm per pixel of *this* array (None when unknown).
    descriptors: radiologist BI-RADS descriptors where the centre provides them
    (BrEaST: Shape, Margin, Echogenicity, Posterior_features, Halo, Calcifications, BIRADS ...).
    source: the image's path, for messages at the site only; it never leaves the site.
    has_mask / has_label: whether the mask / the label is known (partial annotations). An unknown
    mask is stored all False and an unknown label as a placeholder (NORMAL for an empty mask,
    BENIGN otherwise, so splits still stratify); the loss never reads either.
    """

    image: np.ndarray
    mask: np.ndarray
    label: Label
    case_id: str
    patient_id: str
    centre: str
    spacing_mm: float | None = None
    descriptors: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    has_mask: bool = True
    has_label: bool = True

    def __post_init__(self) -> None:
        if not (self.has_mask or self.has_label):
            raise DataError(f"case {self.case_id} ({self.source or self.centre}): neither a mask "
                            "nor a label")

    @property
    def malignant(self) -> float:
        """Classification target: 1.0 malignant, 0.0 benign or normal."""
        return 1.0 if self.label == Label.MALIGNANT else 0.0

    @property
    def has_lesion(self) -> bool:
        """Lesion present: from the mask where it is known, else from the label (benign or
        malignant = a lesion, normal = none)."""
        return bool(self.mask.any()) if self.has_mask else self.label != Label.NORMAL
