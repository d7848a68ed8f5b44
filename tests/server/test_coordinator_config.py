"""server/coordinator_config.py: the deployment file's site list obeys the one site-name rule."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from server.coordinator_config import load_coordinator_config


def test_site_names_are_checked_and_key_paths_resolved(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump({"insecure": True, "sites": {"udiat": "keys/udiat.pub"}}))
    cfg = load_coordinator_config(path, {})
    assert cfg.sites == {"udiat": str(tmp_path / "keys" / "udiat.pub")}
    path.write_text(yaml.safe_dump({"insecure": True, "sites": {"bad name": "k.pub"}}))
    with pytest.raises(ConfigError, match="coordinator.yaml.*site name 'bad name'"):
        load_coordinator_config(path, {})
