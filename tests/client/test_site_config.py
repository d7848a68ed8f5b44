"""client/site_config.py: parsing, path resolution, validation and the node_config it makes."""
from __future__ import annotations

from pathlib import Path

import pytest

from client.site_config import load_site_config, site_config_from_dict
from common.config import ConfigError
from launch.flwr_env import kv_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, "site: udiat\nsuperlink: 10.0.0.5:9093\nca_cert: pki/ca.crt\n"
                            "private_key: keys/udiat\ndata: {path: ../data/udiat, format: UDIAT}\n"
                            "state_dir: state\n")
    cfg = load_site_config(path)
    conf = path.parent.resolve()
    assert cfg.ca_cert == str(conf / "pki" / "ca.crt")
    assert cfg.data.path == str(tmp_path.resolve() / "data" / "udiat")
    assert cfg.state_path == conf / "state"
    node = cfg.node_config()
    assert node["site"] == "udiat" and node["data-format"] == "UDIAT"
    assert node["data-path"] == cfg.data.path and "synthetic-centre" not in node
    assert kv_config({"site": "udiat", "synthetic-n": 16, "x": None}) == 'site="udiat" synthetic-n=16'


def test_unknown_keys_and_typos_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "site: udiat\ninsecure: true\ndata: {path: /d}\nruntime_prot: 9095\n")
    with pytest.raises(ConfigError, match=r"site\.yaml.*runtime_prot"):
        load_site_config(path)


def test_tls_material_is_required_unless_insecure(tmp_path: Path) -> None:
    path = _write(tmp_path, "site: udiat\ndata: {path: /d}\n")
    with pytest.raises(ConfigError, match="ca_cert and private_key"):
        load_site_config(path)
    assert load_site_config(path, {"insecure": True}).insecure


def test_exactly_one_data_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        site_config_from_dict({"site": "a", "insecure": True, "data": {}}, "x")
    with pytest.raises(ConfigError, match="exactly one"):
        site_config_from_dict({"site": "a", "insecure": True,
                               "data": {"path": "/d", "synthetic_centre": "BUSI"}}, "x")
    cfg = site_config_from_dict({"site": "a", "insecure": True,
                                 "data": {"synthetic_centre": "BUSI", "synthetic_n": 16}}, "x")
    assert cfg.node_config()["synthetic-n"] == 16 and "data-path" not in cfg.node_config()


def test_overrides_replace_yaml_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "site: udiat\ninsecure: true\ndata: {path: /a, format: auto}\n")
    cfg = load_site_config(path, {"data.path": "/b", "runtime_port": 9100, "tuning.fast": False})
    assert cfg.data.path == "/b" and cfg.data.format == "auto"
    assert cfg.runtime_port == 9100 and cfg.tuning.fast is False


def test_bad_site_name_and_address_are_refused() -> None:
    with pytest.raises(ConfigError, match="site name"):
        site_config_from_dict({"site": "bad name", "insecure": True, "data": {"path": "/d"}}, "x")
    with pytest.raises(ConfigError, match="host:port"):
        site_config_from_dict({"site": "a", "insecure": True, "superlink": "nohost",
                               "data": {"path": "/d"}}, "x")


def test_heartbeat_must_be_in_the_superlinks_range() -> None:
    base = {"site": "a", "insecure": True, "data": {"path": "/d"}}
    with pytest.raises(ConfigError, match=r"heartbeat_s must be in \[10, 1800\]"):
        site_config_from_dict({**base, "tuning": {"heartbeat_s": 5}}, "x")
    assert site_config_from_dict({**base, "tuning": {"heartbeat_s": 10}}, "x").tuning.heartbeat_s == 10


def test_after_run_is_wait_by_default_and_validated(tmp_path: Path) -> None:
    base = {"site": "a", "insecure": True, "data": {"synthetic_centre": "BUSI"}}
    assert site_config_from_dict(base, "x").after_run == "wait"
    assert site_config_from_dict({**base, "after_run": "exit"}, "x").after_run == "exit"
    path = _write(tmp_path, "site: a\ninsecure: true\ndata: {path: /d}\nafter_run: linger\n")
    with pytest.raises(ConfigError, match=r"site\.yaml.*after_run must be one of \('wait', 'exit'\)"):
        load_site_config(path)
    with pytest.raises(ConfigError, match="coordinator_gone_s"):
        site_config_from_dict({**base, "tuning": {"coordinator_gone_s": 0}}, "x")
