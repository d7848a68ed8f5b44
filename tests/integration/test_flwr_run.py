"""`flwr run .` — the first command a Flower user tries — runs the smoke demo federation in
Flower's own simulation and leaves a run folder with a model; its detached SuperLink is stopped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.flwr_env import flwr_env
from launch.process import bin_path

REPO = Path(__file__).resolve().parents[2]
LOCAL_SUPERLINK_PORT = 39091  # fixed by Flower for the managed local SuperLink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400), pytest.mark.xdist_group("ray")]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_local_superlink(flwr_home: Path) -> None:
    """The managed SuperLink outlives `flwr run`; stop the one started with this FLWR_HOME."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in a for a in args) and any(str(flwr_home).encode() in a for a in args):
            try:
                os.kill(int(cmdline.parent.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_flwr_run_dot_runs_the_smoke_demo(tmp_path: Path) -> None:
    if _port_busy(LOCAL_SUPERLINK_PORT):
        pytest.skip(f"port {LOCAL_SUPERLINK_PORT} is in use (a local Flower SuperLink is running)")
    home, runs = tmp_path / "flwr-home", tmp_path / "runs"
    env = {**flwr_env(home), "FEDBUS_RUNS": str(runs)}
    try:
        proc = subprocess.run([bin_path("flwr"), "run", ".", "--stream"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        _stop_local_superlink(home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    folders = list(runs.glob("flwr-run-*"))
    assert len(folders) == 1, out[-3000:]
    run = folders[0]
    assert yaml.safe_load((run / "status.json").read_text())["state"] == "finished"
    assert (run / "model.pt").is_file() and (run / "model.card.md").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["experiment"]["model"]["base_channels"] == 8  # the smoke preset's network
