"""Bad data hardening (common/data/io.py, common/data/manifest.py, the site check, the
simulation's refusal of an empty centre): a clear error naming the file, never a traceback or
a hang, and warnings for pairs that load but look wrong."""
from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.check import main as site_check
from common.data import load_format
from common.data.check import check_site
from common.data.io import FileError, read_case, read_grey, read_mask, read_table
from common.records import Label


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = 20000) -> Path:
    """A 100-byte PNG whose header claims side × side grey pixels (the data is one row)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _within(seconds: float, fn, *args):
    """Run ``fn`` in a thread; fail (not hang) if it has not returned in time."""
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn!r} hung"
    return out


def test_a_decompression_bomb_is_a_clear_error_naming_the_file(tmp_path) -> None:
    bomb = write_bomb(tmp_path / "bomb.png")  # over Pillow's own limit: refused while opening
    medium = write_bomb(tmp_path / "medium.png", 9000)  # under Pillow's limit, over ours
    assert bomb.stat().st_size < 1000
    for reader in (read_grey, read_mask):
        for path in (bomb, medium):
            with pytest.raises(FileError) as err:
                reader(path)
            assert str(err.value).startswith(f"{path}: ") and "decompression bomb" in str(err.value)
            assert err.value.kind == "bomb"
        with pytest.raises(FileError, match="9000x9000"):
            reader(medium)


def test_a_fifo_is_refused_without_opening_it(tmp_path) -> None:
    fifo = tmp_path / "case.png"
    os.mkfifo(fifo)
    for reader in (read_grey, read_mask, read_table):
        out = _within(5.0, reader, fifo)
        err = out.get("error")
        assert isinstance(err, FileError) and str(fifo) in str(err) and "FIFO" in str(err)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(FileError, match="folder"):
        read_grey(folder)


def test_a_fifo_in_a_centre_folder_or_as_the_manifest_is_named_not_opened(tmp_path) -> None:
    benign = tmp_path / "BUSI" / "benign"
    benign.mkdir(parents=True)
    os.mkfifo(benign / "benign (1).png")
    result = _within(10.0, lambda: load_format("BUSI", tmp_path / "BUSI", strict=False))["value"]
    assert [(Path(e.path).name, e.kind) for e in result.errors] == [("benign (1).png", "not-regular")]
    site = tmp_path / "site"
    site.mkdir()
    os.mkfifo(site / "manifest.csv")
    result = _within(10.0, lambda: load_format("manifest", site, strict=False))["value"]
    assert "FIFO" in result.errors[0].message and result.errors[0].path.endswith("manifest.csv")


def _site(root: Path, rows: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text("image,label,mask\n" + "\n".join(rows) + "\n")
    return root


def test_a_fifo_or_a_bomb_in_a_manifest_site_is_an_issue_and_the_check_ends(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "site"
    root.mkdir()
    _png(root / "ok.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    write_bomb(root / "bomb.png")
    os.mkfifo(root / "pipe.png")
    _site(root, ["ok.png,normal,", "bomb.png,normal,", "pipe.png,normal,"])
    out = _within(20.0, check_site, root, "manifest")
    report = out["value"]
    assert report.n_cases == 1 and {Path(e.path).name for e in report.errors} == {"bomb.png", "pipe.png"}
    assert _within(20.0, site_check, ["--data", str(root)])["value"] == 1
    text = capsys.readouterr().out
    assert "bomb.png" in text and "pipe.png" in text and "Traceback" not in text


def test_suspicious_pairs_are_warned_about(tmp_path) -> None:
    rng = np.random.default_rng(1)
    img = _png(tmp_path / "img.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    small = _png(tmp_path / "small.png", rng.integers(0, 256, (20, 48), dtype=np.uint8))
    big_mask = np.zeros((48, 48), dtype=np.uint8)
    big_mask[:, :30] = 255  # 62.5 %
    big = _png(tmp_path / "big_mask.png", big_mask)
    ok_mask = np.zeros((48, 48), dtype=np.uint8)
    ok_mask[5:15, 5:15] = 255
    ok = _png(tmp_path / "ok_mask.png", ok_mask)
    small_mask = _png(tmp_path / "small_mask.png", ok_mask[:20])
    fields = {"case_id": "c", "patient_id": "p", "centre": "X"}

    def kinds(image: Path, mask: Path) -> set[str]:
        return {n.kind for n in read_case(image, [mask], Label.BENIGN, **fields)[1]}

    assert kinds(img, ok) == set()  # a plain case: no warning
    assert kinds(img, big) == {"mask-large"}
    assert kinds(small, small_mask) == {"image-small"}
    assert "mask-is-image" in kinds(img, img)  # the image listed as its own mask
    assert "mask-is-image" in kinds(ok, ok)  # a mask listed as the image


def test_warnings_reach_the_site_check_as_warning_issues(tmp_path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "site"
    root.mkdir()
    _png(root / "a.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    full = np.full((48, 48), 255, dtype=np.uint8)
    _png(root / "a_mask.png", full)
    _site(root, ["a.png,benign,a_mask.png"])
    report = check_site(root, "manifest")
    assert report.ok and report.n_cases == 1
    assert [(Path(w.path).name, w.kind) for w in report.warnings] == [("a_mask.png", "mask-large")]


def test_manifest_paths_must_stay_inside_the_manifest_folder(tmp_path) -> None:
    rng = np.random.default_rng(3)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = _png(outside / "secret.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    root = tmp_path / "site"
    root.mkdir()
    _png(root / "ok.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    (root / "link.png").symlink_to(secret)
    (root / "sub").mkdir()
    _png(root / "sub" / "inner.png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    _site(root, ["ok.png,normal,",
                 "../outside/secret.png,normal,",  # row 3: '..' escape
                 f"{secret},normal,",  # row 4: absolute path outside
                 "link.png,normal,",  # row 5: symlink out
                 "ok.png|,normal,../outside/secret.png",  # row 6: a mask outside
                 f"{root / 'sub' / 'inner.png'},normal,"])  # row 7: absolute but inside: fine
    result = load_format("manifest", root, strict=False)
    assert sorted(c.case_id for c in result.cases) == sorted(["ok", (root / "sub" / "inner").as_posix()])
    escapes = [e.message for e in result.errors if e.kind == "path-outside"]
    assert [m.split(":")[0] for m in escapes] == ["row 3", "row 4", "row 5", "row 6"]
    assert all("outside" in m for m in escapes)


def test_simulation_refuses_an_empty_centre_before_writing_a_run_folder(tmp_path, monkeypatch, capsys) -> None:
    from sim import leave_center_out as lco

    monkeypatch.setenv("FEDBUS_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(4)
    data = tmp_path / "data"
    for cls in ("benign", "malignant", "normal"):  # a valid BUSI
        (data / "BUSI" / cls).mkdir(parents=True)
        for i in range(1, 4):
            _png(data / "BUSI" / cls / f"{cls} ({i}).png", rng.integers(0, 256, (48, 48), dtype=np.uint8))
            mask = np.zeros((48, 48), dtype=np.uint8)
            if cls != "normal":
                mask[5:15, 5:15] = 255
            _png(data / "BUSI" / cls / f"{cls} ({i})_mask.png", mask)
    (data / "UDIAT").mkdir()  # a centre folder with nothing usable in it
    out = tmp_path / "runs"
    code = lco.main(["--data-root", str(data), "--preset", "smoke", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "UDIAT" in err and "no usable images" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
