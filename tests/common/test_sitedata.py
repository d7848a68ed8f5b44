"""common/sitedata.py: a site's split as tensors, memoised in-process and cached on disk."""
from __future__ import annotations

import pytest

import common.sitedata as sitedata
from common.config import DataConfig
from common.data.synthetic import make_centre
from common.federation import SiteSpec
from common.sitedata import clear_memo, load_site_tensors, load_test_tensors

CFG = DataConfig(image_size=32, val_fraction=0.25, seed=0)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    clear_memo()


def test_split_is_disjoint_complete_and_deterministic() -> None:
    site = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=20)
    train, val = load_site_tensors(site, CFG)
    assert len(train) > 0 and len(val) > 0
    assert not set(train.case_ids) & set(val.case_ids)
    assert len(train) + len(val) == 20 and train.size == 32
    clear_memo()
    train2, val2 = load_site_tensors(site, CFG)
    assert train2.case_ids == train.case_ids and val2.case_ids == val.case_ids


def test_in_process_memo_returns_the_same_tensors() -> None:
    site = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=8)
    assert load_site_tensors(site, CFG)[0] is load_site_tensors(site, CFG)[0]


def test_empty_validation_split_is_an_empty_dataset_of_the_right_size() -> None:
    site = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=6)
    train, val = load_site_tensors(site, DataConfig(image_size=32, val_fraction=0.0))
    assert len(train) == 6 and len(val) == 0 and tuple(val.images.shape[1:]) == (1, 32, 32)


def test_real_sites_are_read_once_then_served_from_the_disk_cache(tmp_path, monkeypatch) -> None:
    calls: list[str] = []

    def fake_cases(site: SiteSpec, data_cfg: DataConfig):
        calls.append(site.name)
        return make_centre("SynEG", 12, size=40, seed=1)

    monkeypatch.setattr(sitedata, "site_cases", fake_cases)
    site = SiteSpec("H1", data_path=str(tmp_path / "nowhere"))
    train, val = load_site_tensors(site, CFG, cache_dir=str(tmp_path / "cache"))
    assert calls == ["H1"]  # one decode for both parts
    assert len(list((tmp_path / "cache").glob("H1-*.pt"))) == 2
    clear_memo()  # as in a fresh process
    train2, val2 = load_site_tensors(site, CFG, cache_dir=str(tmp_path / "cache"))
    assert calls == ["H1"] and train2.case_ids == train.case_ids and val2.case_ids == val.case_ids


def test_held_out_centre_is_used_whole() -> None:
    site = SiteSpec("D", synthetic_centre="SynES1", synthetic_n=9)
    assert len(load_test_tensors(site, CFG)) == 9


def test_a_labels_only_site_trains_without_masks_but_is_tested_on_them() -> None:
    full = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=12)
    labels_only = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=12, masks=False)
    cfg = DataConfig(image_size=32, val_fraction=0.0)
    train, _ = load_site_tensors(full, cfg)
    hidden, _ = load_site_tensors(labels_only, cfg)
    assert hidden.case_ids == train.case_ids
    assert train.has_mask.any() and not hidden.has_mask.any()
    assert bool((hidden.has_label == train.has_label).all())  # every label kept
    assert load_test_tensors(labels_only, cfg).has_mask.any()


def test_own_test_split_is_what_training_holds_back() -> None:
    site = SiteSpec("A", synthetic_centre="SynPL", synthetic_n=24)
    cfg = DataConfig(image_size=32, val_fraction=0.25, test_fraction=0.25, seed=0)
    train, val = load_site_tensors(site, cfg)
    test = sitedata.load_own_test_tensors(site, cfg)
    ids = [set(train.case_ids), set(val.case_ids), set(test.case_ids)]
    assert all(ids) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(train) + len(val) + len(test) == 24
    with pytest.raises(ValueError, match="site A: data.test_fraction is 0"):
        sitedata.load_own_test_tensors(site, CFG)
