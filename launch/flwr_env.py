"""The Flower environment every process we start runs with, and ``key=value`` config strings.

Every child gets telemetry, the update check and runtime dependency installation switched off
(``FLWR_ENV``). FLWR_HOME always lives in a state folder outside the app directory: ``flwr run``
bundles the app directory into the FAB, and a Flower home inside it breaks the FAB depth check.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

#: Set in every process we start (and in our own): no phone-home, no `uv sync` at run time.
FLWR_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flwr_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus FLWR_ENV (and FLWR_HOME when given), with this interpreter's bin folder
    first on PATH: the SuperLink/SuperNode start ``flower-superexec`` and ``flwr-*app`` by name."""
    env = dict(os.environ)
    env.update(FLWR_ENV)
    bindir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]).rstrip(os.pathsep)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def apply_flwr_env(flwr_home: str | Path | None = None) -> None:
    """Put FLWR_ENV into this process's environment (before flwr is imported)."""
    os.environ.update(FLWR_ENV)
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home)


def toml_value(value: object) -> str:
    """A Python scalar as a TOML literal (for --run-config / --node-config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def kv_config(values: Mapping[str, object]) -> str:
    """``{"site": "udiat", "synthetic-n": 16}`` → ``site="udiat" synthetic-n=16`` (None skipped)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items() if v is not None)
