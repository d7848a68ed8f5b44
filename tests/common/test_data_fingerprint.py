"""Data fingerprint in the tensor-cache keys (common/data/fingerprint.py, common/sitedata.py,
common/data/tensors.py) and the per-user cache: a withdrawn or changed image is never used again."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.runtime import RoundConfig, resolve_site, site_info, train_round
from common import sitedata
from common.config import DataConfig, to_dict
from common.data.fingerprint import READER_VERSION, files_fingerprint
from common.data.synthetic import make_centre
from common.data.tensors import cached_tensors
from common.federation import SiteSpec, build_experiment_model
from common.sitedata import clear_memo, load_site_tensors, user_tensor_cache
from tests.server.local_grid import tiny_spec

CFG = DataConfig(image_size=32, val_fraction=0.25, seed=0)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    clear_memo()


def make_manifest_site(root: Path, n: int = 12, size: int = 48) -> Path:
    """``n`` cases (benign, malignant, normal in turn; noise images, square lesions) listed in
    ``root/manifest.csv``; returns ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,label,mask"]
    for i in range(n):
        label = ("benign", "malignant", "normal")[i % 3]
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / f"c{i:02d}.png")
        mask = np.zeros((size, size), dtype=np.uint8)
        if label != "normal":
            mask[10:20, 12:22] = 255
        Image.fromarray(mask).save(root / f"c{i:02d}_mask.png")
        rows.append(f"c{i:02d}.png,{label},c{i:02d}_mask.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def withdraw(root: Path, keep: int) -> None:
    """Delete every case from ``keep`` on: its files and its manifest row."""
    lines = (root / "manifest.csv").read_text().splitlines()
    for i in range(keep, len(lines) - 1):
        (root / f"c{i:02d}.png").unlink()
        (root / f"c{i:02d}_mask.png").unlink()
    (root / "manifest.csv").write_text("\n".join(lines[: keep + 1]) + "\n")


# ------------------------------------------------------------------ the fingerprint itself
def test_fingerprint_follows_the_file_list_sizes_and_times(tmp_path) -> None:
    site = make_manifest_site(tmp_path / "site", n=3)
    first = files_fingerprint(site)
    assert first == files_fingerprint(site) == files_fingerprint(site / "manifest.csv")
    assert len(first) == 16
    (site / ".DS_Store").write_bytes(b"x")  # OS metadata does not count
    assert files_fingerprint(site) == first
    img = site / "c00.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, new time
    touched = files_fingerprint(site)
    assert touched != first
    (site / "c01_mask.png").unlink()  # withdrawn
    assert files_fingerprint(site) not in (first, touched)
    assert files_fingerprint(tmp_path / "nowhere") != first  # missing: a fingerprint of its own


def test_fingerprint_skips_a_cache_inside_the_data_folder_and_never_opens_files(tmp_path) -> None:
    site = make_manifest_site(tmp_path / "site", n=2)
    before = files_fingerprint(site, exclude=site / "cache")
    (site / "cache").mkdir()
    (site / "cache" / "x.pt").write_bytes(b"tensors")
    os.mkfifo(site / "pipe")  # stat only: a FIFO cannot block it
    after = files_fingerprint(site, exclude=site / "cache")
    assert after != before  # the FIFO is a file under the folder
    (site / "pipe").unlink()
    assert files_fingerprint(site, exclude=site / "cache") == before


def test_reader_version_and_fingerprint_are_in_the_cache_file_name(tmp_path) -> None:
    cases = make_centre("SynES1", 4, size=32)
    calls: list[int] = []

    def load():
        calls.append(1)
        return cases

    cached_tensors(load, 32, tmp_path, "k", fingerprint="aaaa")
    cached_tensors(load, 32, tmp_path, "k", fingerprint="aaaa")
    assert len(calls) == 1
    cached_tensors(load, 32, tmp_path, "k", fingerprint="bbbb")  # other data: a miss
    assert len(calls) == 2
    assert len(list(tmp_path.glob("k-*-32.pt"))) == 1  # the stale entry was removed
    assert isinstance(READER_VERSION, int)


# ------------------------------------------------------------------ withdrawn data
def test_deleted_cases_are_gone_from_the_next_load_through_the_disk_cache(tmp_path) -> None:
    site_dir = make_manifest_site(tmp_path / "site", n=12)
    site = SiteSpec("H1", data_path=str(site_dir), data_format="manifest")
    cache = str(tmp_path / "cache")
    train, val = load_site_tensors(site, CFG, cache)
    assert len(train) + len(val) == 12
    withdraw(site_dir, keep=6)
    train2, val2 = load_site_tensors(site, CFG, cache)  # same process: the memo must not serve it
    assert len(train2) + len(val2) == 6 and len(train2) < len(train)
    assert not {f"c{i:02d}" for i in range(6, 12)} & set(train2.case_ids + val2.case_ids)
    clear_memo()  # a fresh process: the disk cache must not serve it either
    train3, val3 = load_site_tensors(site, CFG, cache)
    assert train3.case_ids == train2.case_ids and val3.case_ids == val2.case_ids
    for f in Path(cache).glob("*.pt"):  # patient images: private, and no stale copy kept
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert len(list(Path(cache).glob("*.pt"))) == 2


def test_a_flower_site_reports_fewer_examples_after_a_withdrawal(tmp_path) -> None:
    """The deployment path: node_config → resolve_site → the query's num-train and a training
    round's num-examples, both from load_site_tensors through the site's disk cache."""
    site_dir = make_manifest_site(tmp_path / "site", n=12)
    spec = tiny_spec(tmp_path / "run")
    node_config = {"site": "H1", "data-path": str(site_dir), "data-format": "manifest",
                   "cache-dir": str(tmp_path / "cache"), "state-dir": str(tmp_path / "state")}
    ctx = resolve_site(node_config, server_experiment=json.dumps(to_dict(spec.experiment)))
    rc = RoundConfig(server_round=1, num_rounds=1, run_key="t")
    state = build_experiment_model(ctx.experiment).state_dict()
    before = site_info(ctx, "test")
    trained = train_round(ctx, state, rc).metrics["num-examples"]
    withdraw(site_dir, keep=6)
    clear_memo()  # deployment: a fresh process per message
    after = site_info(ctx, "test")
    assert before["num-train"] + before["num-val"] == 12 and after["num-train"] + after["num-val"] == 6
    assert train_round(ctx, state, rc).metrics["num-examples"] == after["num-train"] < trained


def test_a_changed_image_is_decoded_again(tmp_path, monkeypatch) -> None:
    site_dir = make_manifest_site(tmp_path / "site", n=6)
    site = SiteSpec("H1", data_path=str(site_dir), data_format="manifest")
    calls: list[str] = []
    real = sitedata.site_cases
    monkeypatch.setattr(sitedata, "site_cases", lambda s, c: calls.append(s.name) or real(s, c))
    first = sitedata.load_test_tensors(site, CFG, str(tmp_path / "cache"))
    clear_memo()
    sitedata.load_test_tensors(site, CFG, str(tmp_path / "cache"))
    assert len(calls) == 1  # unchanged: served from disk
    Image.fromarray(np.full((48, 48), 7, dtype=np.uint8)).save(site_dir / "c02.png")  # corrected
    clear_memo()
    second = sitedata.load_test_tensors(site, CFG, str(tmp_path / "cache"))
    assert len(calls) == 2 and not np.array_equal(first.images[2].numpy(), second.images[2].numpy())


# ------------------------------------------------------------------ the per-user cache
def test_user_cache_folder_honours_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDBUS_CACHE_DIR", str(tmp_path / "mine"))
    assert user_tensor_cache() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("FEDBUS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = user_tensor_cache()
    assert path == tmp_path / "xdg" / "fedbus" / "tensors"
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0  # private to the user
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_tensor_cache() == tmp_path / "home" / ".cache" / "fedbus" / "tensors"


def test_one_name_at_two_data_roots_shares_a_cache_without_evicting(tmp_path, monkeypatch) -> None:
    """The per-user cache serves every run: the same centre name at two folders keeps both."""
    a = SiteSpec("BUSI", data_path=str(make_manifest_site(tmp_path / "a", n=6)), data_format="manifest")
    b = SiteSpec("BUSI", data_path=str(make_manifest_site(tmp_path / "b", n=9)), data_format="manifest")
    cache = str(tmp_path / "cache")
    calls: list[str] = []
    real = sitedata.site_cases
    monkeypatch.setattr(sitedata, "site_cases", lambda s, c: calls.append(s.data_path) or real(s, c))
    for _ in range(2):
        assert len(sitedata.load_test_tensors(a, CFG, cache)) == 6
        assert len(sitedata.load_test_tensors(b, CFG, cache)) == 9
        clear_memo()
    assert calls == [a.data_path, b.data_path]
