"""Partial annotations: hidden masks / labels by patient, deterministic, never both; the config
refuses fractions outside [0, 1] before a run starts; tensors carry and count the kinds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ConfigError, DataConfig
from common.data.partial import hide_annotations
from common.data.tensors import batches, to_tensors
from common.records import Case, DataError, Label
from common.settings import load_settings

SIZE = 32


def _case(i: int, patient: str, label: Label) -> Case:
    mask = np.zeros((SIZE, SIZE), bool)
    if label != Label.NORMAL:
        mask[4 + i % 8: 14 + i % 8, 6:18] = True
    image = np.full((SIZE, SIZE), (37 * i) % 251, np.uint8)  # distinct pixels: no duplicates
    image[0, 0] = i % 256
    image[0, 1] = i // 256
    return Case(image=image, mask=mask, label=label, case_id=f"c{i}", patient_id=patient,
                centre="X")


def _cases() -> list[Case]:
    """40 patients × 2 lesion images (benign/malignant alternating) + 10 normal images."""
    out = [_case(2 * p + k, f"P{p}", Label.BENIGN if p % 2 else Label.MALIGNANT)
           for p in range(40) for k in range(2)]
    return out + [_case(80 + j, f"N{j}", Label.NORMAL) for j in range(10)]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_mask_fraction_is_respected_by_patient_and_deterministic(fraction: float) -> None:
    cases = _cases()
    a = hide_annotations(cases, mask_fraction=fraction, seed=3)
    b = hide_annotations(cases, mask_fraction=fraction, seed=3)
    kept = [c.case_id for c in a if c.has_mask and c.label != Label.NORMAL]
    assert kept == [c.case_id for c in b if c.has_mask and c.label != Label.NORMAL]
    assert len(kept) == round(fraction * 80)  # patients of 2 images: exact at these fractions
    by_patient: dict[str, set[bool]] = {}
    for c in a:
        by_patient.setdefault(c.patient_id, set()).add(c.has_mask)
    assert all(len(v) == 1 for v in by_patient.values())  # whole patients
    assert all(c.has_mask for c in a if c.label == Label.NORMAL)  # normals keep the empty mask
    assert all(c.has_label for c in a)
    hidden = [c for c in a if not c.has_mask]
    assert all(not c.mask.any() and c.has_lesion for c in hidden)  # lesion from the label
    assert all(cases[i].has_mask for i in range(len(cases)))  # the input is not modified
    if 0 < fraction < 1:
        other = hide_annotations(cases, mask_fraction=fraction, seed=4)
        assert kept != [c.case_id for c in other if c.has_mask and c.label != Label.NORMAL]


def test_labels_hidden_only_where_the_mask_is_kept() -> None:
    out = hide_annotations(_cases(), mask_fraction=0.5, label_fraction=0.5, seed=0)
    assert all(c.has_mask or c.has_label for c in out)
    assert sum(c.has_label for c in out) == 45
    for c in out:
        if not c.has_label:
            assert c.label == (Label.BENIGN if c.mask.any() else Label.NORMAL)


def test_bad_fraction_and_an_unannotated_case_are_refused() -> None:
    with pytest.raises(ValueError, match="mask_fraction"):
        hide_annotations(_cases(), mask_fraction=1.5)
    with pytest.raises(ConfigError, match="data.mask_fraction"):
        load_settings("smoke", ["data.mask_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.label_fraction"):
        DataConfig(label_fraction=-0.1)
    with pytest.raises(DataError, match="neither a mask nor a label"):
        import dataclasses
        dataclasses.replace(_cases()[0], has_mask=False, has_label=False)


def test_tensors_carry_and_count_the_kinds_and_batches_decide_lesions() -> None:
    cases = hide_annotations(_cases()[:20], mask_fraction=0.5, seed=1)
    cases[1] = Case(image=cases[1].image, mask=cases[1].mask, label=Label.BENIGN, case_id="m",
                    patient_id="Q", centre="X", has_label=False) if cases[1].has_mask else cases[1]
    data = to_tensors(cases, SIZE)
    assert data.has_mask.tolist() == [c.has_mask for c in cases]
    assert data.has_label.tolist() == [c.has_label for c in cases]
    counts = data.annotation_counts()
    assert sum(counts.values()) == 20 and counts["label only"] == 10
    assert bool(data.masks[~data.has_mask].sum() == 0)
    assert data.has_lesion.all()  # lesion images all, whether from the mask or the label
    sub = data.subset([0, 1, 2])
    assert sub.has_mask.tolist() == data.has_mask[:3].tolist()
    batch = next(iter(batches(data, 20, shuffle=False)))
    assert torch.equal(batch["has_mask"], data.has_mask)
    assert torch.equal(batch["has_label"], data.has_label)
    assert batch["has_lesion"].all()


def test_a_cache_written_before_partial_annotations_reads_as_fully_annotated(tmp_path) -> None:
    from common.data.tensors import _read_cache

    data = to_tensors(_cases()[:4], SIZE)
    payload = {k: getattr(data, k) for k in ("images", "masks", "malignant", "labels", "has_lesion",
                                             "spacing_mm", "case_ids", "centres")}
    torch.save(payload, tmp_path / "old.pt")
    old = _read_cache(tmp_path / "old.pt", SIZE)
    assert old.has_mask.all() and old.has_label.all() and len(old.has_mask) == 4
    assert old.fingerprint() == data.fingerprint()


def test_site_loader_hides_masks_in_the_training_split_only() -> None:
    from common.federation import SiteSpec
    from common.sitedata import clear_memo, load_site_tensors

    clear_memo()
    site = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=24)
    cfg = DataConfig(image_size=32, val_fraction=0.25, mask_fraction=0.0, seed=1)
    train, val = load_site_tensors(site, cfg)
    lesion = train.labels != int(Label.NORMAL)
    assert lesion.any() and not train.has_mask[lesion].any() and train.has_label.all()
    assert train.annotation_counts()["label only"] == int(lesion.sum())
    assert val.has_mask.all() and val.masks[val.labels != int(Label.NORMAL)].sum() > 0
    full, _ = load_site_tensors(site, DataConfig(image_size=32, val_fraction=0.25, seed=1))
    assert full.case_ids == train.case_ids and full.has_mask.all()
    clear_memo()
