"""fedbus-pki kit (launch/pki.py): a site's starter folder in one step."""
from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.site_config import load_site_config
from launch.pki import key_fingerprint, main, make_ca, make_site_kit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    make_ca(root)
    return root


def test_kit_writes_a_site_folder_the_site_loader_accepts(ca: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "udiat-kit"
    assert main(["kit", "udiat", "--out", str(out), "--superlink", "fl.example.org:9092",
                 "--ca", str(ca), "--data", "images"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "site.yaml", "udiat", "udiat.pub"]
    assert stat.S_IMODE((out / "udiat").stat().st_mode) == 0o600
    assert (out / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()  # the certificate, never ca.key
    cfg = load_site_config(out / "site.yaml")
    assert cfg.site == "udiat" and cfg.superlink == "fl.example.org:9092"
    assert cfg.ca_cert == str((out / "ca.crt").resolve())
    assert cfg.private_key == str((out / "udiat").resolve())
    assert cfg.data.path == str((out / "images").resolve())
    assert cfg.state_dir == str((out / "state").resolve())
    fingerprint = key_fingerprint((out / "udiat.pub").read_bytes())  # what the coordinator's audit log shows
    printed = capsys.readouterr().out
    assert f"key fingerprint (sha256): {fingerprint}" in printed
    assert f"{fingerprint[:4]} {fingerprint[4:8]} {fingerprint[8:12]} {fingerprint[12:16]}" in printed


def test_kit_yaml_has_every_key_of_the_example(ca: Path, tmp_path: Path) -> None:
    paths = make_site_kit("busi", tmp_path / "k", "10.0.0.5:9092", ca / "ca.crt")
    kit = yaml.safe_load(paths["config"].read_text())
    example = yaml.safe_load((REPO / "deploy" / "site.example.yaml").read_text())
    assert set(example) <= set(kit)
    assert set(example["tuning"]) <= set(kit["tuning"]) and set(example["data"]) <= set(kit["data"])


def test_kit_quotes_names_and_addresses_yaml_would_misread(ca: Path, tmp_path: Path) -> None:
    paths = make_site_kit("1e5", tmp_path / "k", "[::1]:9092", ca)
    cfg = load_site_config(paths["config"])
    assert cfg.site == "1e5" and cfg.superlink == "[::1]:9092"  # not the float 100000.0 / a list


def test_kit_refuses_to_overwrite_and_bad_input(ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k"
    make_site_kit("udiat", out, "h:9092", ca)
    key = (out / "udiat").read_bytes()
    assert main(["kit", "udiat", "--out", str(out), "--superlink", "h:9092", "--ca", str(ca)]) == 1
    assert "FileExistsError" in capsys.readouterr().err
    assert (out / "udiat").read_bytes() == key
    for args in (["--superlink", "h", "--ca", str(ca)],                       # no port
                 ["--superlink", "h:9092", "--ca", str(ca / "ca.key")]):       # a key, not a certificate
        assert main(["kit", "busi", "--out", str(tmp_path / "b"), *args]) == 1
    assert not (tmp_path / "b" / "busi").exists()  # nothing written on bad input
    assert main(["kit", "all-sites", "--out", str(tmp_path / "c"), "--superlink", "h:1", "--ca", str(ca)]) == 1


def test_checkout_wrapper_runs_the_same_command(ca: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "deploy" / "pki.py"), "kit", "busi", "--out",
                          str(tmp_path / "k"), "--superlink", "h:9092", "--ca", str(ca)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k" / "busi.pub").is_file() and "key fingerprint" in res.stdout
