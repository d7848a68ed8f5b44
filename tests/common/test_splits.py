"""Splits: identical images grouped, no patient or duplicate across splits, stratified, seeded."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.data.splits import duplicate_groups, split_cases
from common.records import Case, Label


def case(cid: str, label: Label, patient: str | None = None, pixels: int | None = None,
         centre: str = "A", shape: tuple[int, int] = (2, 3)) -> Case:
    seed = pixels if pixels is not None else hash(cid) % 10_000_000
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Case(image=image, mask=np.zeros(shape, bool), label=label, case_id=cid,
                patient_id=patient or cid, centre=centre)


def test_duplicate_groups_by_pixels_only():
    a = case("a", Label.BENIGN, pixels=1)
    b = case("b", Label.MALIGNANT, pixels=2)
    a2 = case("a2", Label.MALIGNANT, patient="other", pixels=1)  # same pixels, other label
    c = case("c", Label.NORMAL, pixels=3)
    assert duplicate_groups([a, b, a2, c]) == [0, 1, 0, 2]


def test_same_bytes_other_shape_is_not_a_duplicate():
    flat = np.arange(6, dtype=np.uint8)
    x = Case(flat.reshape(2, 3), np.zeros((2, 3), bool), Label.BENIGN, "x", "x", "A")
    y = Case(flat.reshape(3, 2), np.zeros((3, 2), bool), Label.BENIGN, "y", "y", "A")
    assert duplicate_groups([x, y]) == [0, 1]


def cohort() -> list[Case]:
    """40 patients with 1–4 images each, some images duplicated across patients."""
    rng = np.random.default_rng(7)
    cases, k = [], 0
    for p in range(40):
        for _ in range(int(rng.integers(1, 5))):
            label = Label(int(rng.choice(3, p=[0.5, 0.3, 0.2])))
            cases.append(case(f"c{k}", label, patient=f"P{p}", pixels=1000 + k))
            k += 1
    for k, j in [(0, 50), (10, 60), (20, 30)]:  # identical images across patients
        cases.append(case(f"dup{k}", cases[j].label, patient=f"Q{k}", pixels=1000 + k))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_patient_or_duplicate_crosses_splits(seed):
    cases = cohort()
    split = split_cases(cases, 0.2, 0.2, seed=seed)
    where = {c.case_id: s for s, part in enumerate((split.train, split.val, split.test))
             for c in part}
    assert sorted(where) == sorted(c.case_id for c in cases)  # a partition
    by_patient: dict[str, set[int]] = {}
    by_dup: dict[int, set[int]] = {}
    for c, g in zip(cases, duplicate_groups(cases)):
        by_patient.setdefault(c.patient_id, set()).add(where[c.case_id])
        by_dup.setdefault(g, set()).add(where[c.case_id])
    assert all(len(s) == 1 for s in by_patient.values())
    assert all(len(s) == 1 for s in by_dup.values())
    # the duplicate chains tie patients together: P0's image equals dup0 (patient Q0)
    assert where["c0"] == where["dup0"]


def test_patient_ids_are_per_centre():
    cases = [case(f"x{i}", Label.BENIGN, patient="P", centre="A" if i % 2 else "B")
             for i in range(40)]
    split = split_cases(cases, 0.5, seed=0)
    assert {c.centre for c in split.train} != {c.centre for c in split.val}
    assert len(split.train) == len(split.val) == 20


def test_deterministic_in_seed():
    cases = cohort()
    ids = lambda s: [[c.case_id for c in part] for part in (s.train, s.val, s.test)]  # noqa: E731
    assert ids(split_cases(cases, 0.2, 0.1, seed=3)) == ids(split_cases(cases, 0.2, 0.1, seed=3))
    assert len({str(ids(split_cases(cases, 0.2, 0.1, seed=s))) for s in range(5)}) > 1


def test_stratified_on_singletons():
    cases = ([case(f"b{i}", Label.BENIGN) for i in range(60)]
             + [case(f"m{i}", Label.MALIGNANT) for i in range(30)]
             + [case(f"n{i}", Label.NORMAL) for i in range(10)])
    split = split_cases(cases, 0.2, 0.1, seed=0)
    counts = [Counter(c.label for c in part) for part in (split.train, split.val, split.test)]
    targets = [(42, 21, 7), (12, 6, 2), (6, 3, 1)]
    for got, want in zip(counts, targets):
        for label, n in zip(Label, want):
            assert abs(got[label] - n) <= 1, (got, want)


def test_stratified_with_groups_stays_close():
    cases = cohort()
    split = split_cases(cases, 0.25, seed=0)
    total = Counter(c.label for c in cases)
    val = Counter(c.label for c in split.val)
    for label in Label:  # groups of ≤ 4 images: within a few images of the target
        assert abs(val[label] - 0.25 * total[label]) <= 4


def test_no_val_or_test_when_fractions_zero():
    cases = cohort()[:10]
    split = split_cases(cases, 0.0)
    assert split.val == [] and split.test == [] and len(split.train) == 10


@pytest.mark.parametrize("val,test", [(-0.1, 0.0), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError):
        split_cases(cohort()[:5], val, test)
