"""``--insecure`` (plaintext, no node authentication) is for loopback trials: on a host other
machines can reach it is refused unless ``--allow-insecure-network`` says so explicitly."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import ConfigError
from server.cli import main
from server.coordinator_config import is_loopback, load_coordinator_config


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("coordinator.example", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_insecure_on_the_network_needs_the_second_switch(tmp_path: Path) -> None:
    assert load_coordinator_config(None, {"insecure": True, "host": "127.0.0.1"}).insecure
    with pytest.raises(ConfigError, match="0.0.0.0.*--allow-insecure-network"):
        load_coordinator_config(None, {"insecure": True, "host": "0.0.0.0"})
    cfg = load_coordinator_config(None, {"insecure": True, "host": "0.0.0.0", "allow_insecure_network": True})
    assert cfg.host == "0.0.0.0" and cfg.allow_insecure_network
    path = tmp_path / "coordinator.yaml"  # the same rule from the deployment file
    path.write_text(yaml.safe_dump({"insecure": True, "host": "10.0.0.1"}))
    with pytest.raises(ConfigError, match="10.0.0.1"):
        load_coordinator_config(path, {})


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": {"preset": "smoke"}, "run_dir": str(tmp_path / "run"),
        "sites": [{"name": "a", "synthetic_centre": "SynPL"}, {"name": "b", "synthetic_centre": "SynES1"}],
    }))
    return path


def test_cli_refuses_insecure_non_loopback_with_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    from server import coordinator

    started: list[str] = []

    class Stub:  # stands in for the coordinator: reached only when the config is accepted
        def __init__(self, cfg, *args, **kwargs) -> None:
            started.append(cfg.host)

        def main(self, **kwargs) -> int:
            return 0

    monkeypatch.setattr(coordinator, "Coordinator", Stub)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # keep pytest's own handlers
    spec = _spec(tmp_path)
    state = str(tmp_path / "state")
    assert main(["--config", str(spec), "--insecure", "--host", "0.0.0.0", "--state-dir", state]) == 2
    err = capsys.readouterr().err
    assert "flower-server:" in err and "--allow-insecure-network" in err and started == []
    assert main(["--config", str(spec), "--insecure", "--host", "0.0.0.0", "--state-dir", state,
                 "--allow-insecure-network"]) == 0
    assert main(["--config", str(spec), "--insecure", "--host", "127.0.0.1", "--state-dir", state]) == 0
    assert started == ["0.0.0.0", "127.0.0.1"]
