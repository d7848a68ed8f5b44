"""launch/flwr_env.py: the environment every child gets, TOML literals and key=value strings."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from launch.flwr_env import FLWR_ENV, apply_flwr_env, flwr_env, kv_config, toml_value


def test_environment_switches_flower_extras_off_and_finds_our_scripts(tmp_path: Path) -> None:
    env = flwr_env(tmp_path / "home", {"PYTHONUNBUFFERED": "1"})
    assert all(env[k] == v for k, v in FLWR_ENV.items()) and env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYTHONUNBUFFERED"] == "1"


def test_apply_sets_this_process(tmp_path: Path, monkeypatch) -> None:
    for key in FLWR_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    apply_flwr_env(tmp_path)
    assert all(os.environ[k] == v for k, v in FLWR_ENV.items()) and os.environ["FLWR_HOME"] == str(tmp_path)


def test_toml_literals_and_key_value_config() -> None:
    assert toml_value('a "b" \\c') == '"a \\"b\\" \\\\c"' and toml_value(True) == "true"
    assert toml_value(3) == "3" and toml_value(0.5) == "0.5"
    assert kv_config({"site": "udiat", "synthetic-n": 16, "cache-dir": None, "strict": False}) == \
        'site="udiat" synthetic-n=16 strict=false'
