"""Leaving cases out: the site YAML's ``data.exclude`` and ``--skip-invalid``, from the YAML through
the site check and the node_config a Flower client reads, to the cases it loads."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.check import main as site_check
from client.cli import main as flower_client
from client.runtime import resolve_site
from client.site_config import load_site_config
from common.data import Exclusion, load_site
from common.records import DataError
from common.sitedata import site_cases
from launch.flwr_env import kv_config
from tests.common.test_data_readers import blob, img, png


def make_site(root: Path) -> Path:
    """A manifest site of three good cases and one unreadable image (``imgs/bad.png``)."""
    rows = ["image,mask,label"]
    for i, name in enumerate("abc"):
        png(root / "imgs" / f"{name}.png", img(i + 1))
        png(root / "masks" / f"{name}.png", blob())
        rows.append(f"imgs/{name}.png,masks/{name}.png,{'benign' if i % 2 else 'malignant'}")
    (root / "imgs" / "bad.png").write_bytes(b"not a png")
    rows.append("imgs/bad.png,,normal")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def site_yaml(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"site: h1\ninsecure: true\ndata:\n  path: data\n  format: manifest\n{extra}")
    return path


EXCLUDE = "  exclude:\n    - {file: imgs/bad.png, reason: truncated upload}\n"


def test_strict_default_refuses_the_site_naming_the_bad_file(tmp_path: Path) -> None:
    make_site(tmp_path / "data")
    with pytest.raises(DataError, match="bad.png"):
        load_site(tmp_path / "data", "manifest")
    spec = load_site_config(site_yaml(tmp_path)).site_spec()
    assert spec.strict and spec.exclude == ()
    with pytest.raises(DataError, match="bad.png"):
        site_cases(spec, _data_cfg())


def test_an_excluded_file_is_left_out_with_its_reason(tmp_path: Path) -> None:
    make_site(tmp_path / "data")
    cfg = load_site_config(site_yaml(tmp_path, EXCLUDE))
    assert cfg.data.exclude == (Exclusion("imgs/bad.png", "truncated upload"),)
    cases = site_cases(cfg.site_spec(), _data_cfg())
    assert sorted(c.case_id for c in cases) == ["imgs/a", "imgs/b", "imgs/c"]
    # by case id / file name stem: the image and its mask go
    left = load_site(tmp_path / "data", "manifest", exclude=(Exclusion("bad"), Exclusion("b", "dup")))
    assert sorted(c.case_id for c in left) == ["imgs/a", "imgs/c"]
    with pytest.raises(DataError, match="bad.png"):  # an entry that matches nothing excludes nothing
        load_site(tmp_path / "data", "manifest", exclude=(Exclusion("imgs/typo.png"),))


def test_the_exclusion_and_skip_invalid_reach_the_flower_client(tmp_path: Path, caplog) -> None:
    make_site(tmp_path / "data")
    for extra, strict in ((EXCLUDE, True), ("  skip_invalid: true\n", False)):
        node = load_site_config(site_yaml(tmp_path, extra)).node_config()
        parsed = parse_config_args([kv_config(node)])  # as flower-supernode --node-config reads it
        site = resolve_site(parsed, server_experiment='{"data": {"image_size": 32}}').site
        assert site.strict is strict
        with caplog.at_level(logging.ERROR, logger="common.data"):
            cases = site_cases(site, _data_cfg())
        assert sorted(c.case_id for c in cases) == ["imgs/a", "imgs/b", "imgs/c"]
    assert any("bad.png" in r.getMessage() for r in caplog.records)  # skipped: named in the site log


def test_site_check_strict_excluded_and_skip_invalid(tmp_path: Path, capsys) -> None:
    data = make_site(tmp_path / "data")
    assert site_check(["--data", str(data)]) == 1
    assert "bad.png" in capsys.readouterr().out
    assert site_check(["--data", str(data), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "--skip-invalid: 1 invalid file(s) left out" in out and "skipped: " in out and "bad.png" in out
    assert "cases: 3" in out and "result: OK" in out
    assert site_check(["--config", str(site_yaml(tmp_path, EXCLUDE))]) == 0
    out = capsys.readouterr().out
    assert "left out by data.exclude (truncated upload)" in out and "result: OK" in out


def test_flower_client_check_agrees_with_the_site_check(tmp_path: Path, capsys) -> None:
    make_site(tmp_path / "data")
    yaml = site_yaml(tmp_path)
    assert flower_client(["--site", "h1", "--config", str(yaml), "--check"]) == 1  # data errors: 1, as fedbus-site-check
    assert flower_client(["--site", "h1", "--config", str(yaml), "--check", "--skip-invalid"]) == 0
    assert "bad.png" in capsys.readouterr().out
    assert flower_client(["--site", "h1", "--config", str(yaml), "--check", "--data", str(tmp_path / "no")]) == 2
    assert site_check(["--data", str(tmp_path / "no")]) == 2


def _data_cfg():
    from common.config import DataConfig

    return DataConfig(image_size=32)
