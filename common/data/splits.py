"""Leak-free train/val/test splits: whole patients and whole duplicate groups per split.

``duplicate_groups`` finds identical pixel arrays (whatever their labels, files or patients);
``split_cases`` unions those with patient ids into groups and assigns whole groups greedily so
each split's label counts approach their targets (stratified group split).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from common.records import Case, Label


@dataclass(frozen=True)
class Split:
    train: list[Case]
    val: list[Case]
    test: list[Case]


def image_digest(image: np.ndarray) -> str:
    """Hash of a decoded grey array (shape included), independent of file format/metadata."""
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def duplicate_groups(cases: list[Case]) -> list[int]:
    """Group id per case (0.. in order of first appearance); identical pixels ⇒ same id."""
    ids: dict[str, int] = {}
    return [ids.setdefault(image_digest(c.image), len(ids)) for c in cases]


def patient_groups(cases: list[Case]) -> list[list[int]]:
    """Union-find over (centre, patient_id) and duplicate group → lists of case indices."""
    parent = list(range(len(cases)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    dups = duplicate_groups(cases)
    for i, case in enumerate(cases):
        for key in (("patient", case.centre, case.patient_id), ("dup", dups[i])):
            j = first.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(cases)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_cases(cases: list[Case], val_fraction: float, test_fraction: float = 0.0,
                seed: int = 0) -> Split:
    """Split into train/val/test by whole groups, stratified by label, deterministic in seed.

    Groups are visited largest first (ties in a seeded random order) and each goes to the split
    whose label counts it moves closest to target (least increase in squared deviation).
    Cases keep their input order within each split.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1; got "
                         f"{val_fraction}, {test_fraction}")
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    labels = np.array([int(c.label) for c in cases], dtype=int)
    n_labels = len(Label)
    totals = np.bincount(labels, minlength=n_labels).astype(float) if len(cases) else \
        np.zeros(n_labels)
    target = fractions[:, None] * totals[None, :]
    counts = np.zeros_like(target)
    groups = patient_groups(cases)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    order = sorted(order, key=lambda g: -len(groups[g]))  # stable: ties stay in random order
    open_splits = [s for s in range(3) if fractions[s] > 0]
    assign = np.zeros(len(cases), dtype=int)
    for g in order:
        vec = np.bincount(labels[groups[g]], minlength=n_labels).astype(float)
        cost = [float(np.sum(vec * (2.0 * (counts[s] - target[s]) + vec))) for s in open_splits]
        best = open_splits[int(np.argmin(cost))]
        counts[best] += vec
        assign[groups[g]] = best
    parts: list[list[Case]] = [[], [], []]
    for case, s in zip(cases, assign):
        parts[int(s)].append(case)
    return Split(*parts)
