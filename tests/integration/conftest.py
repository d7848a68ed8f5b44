"""Real coordinator and sites on 127.0.0.1: certificates once per session, a federation folder
per test, every process stopped in the finaliser, every wait bounded."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from launch.flwr_env import flwr_env
from launch.process import ManagedProcess, bin_path, free_port

REPO = Path(__file__).resolve().parents[2]
SITES = {"udiat": "SynES1", "busi": "SynEG", "bus-uclm": "SynES2"}  # synthetic stand-ins
TINY = {  # the smoke preset with 4 base channels, depth 2, 16 images per site
    "preset": "smoke",
    "data": {"image_size": 32, "val_fraction": 0.25, "augment": False},
    "model": {"base_channels": 4, "depth": 2},
    "train": {"batch_size": 8, "device": "cpu", "num_threads": 1, "progress": False},
}


def _load_pki() -> Any:
    spec = importlib.util.spec_from_file_location("fedbus_pki", REPO / "deploy" / "pki.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, SuperLink certificate (SAN 127.0.0.1) and SuperNode keys for the sites and an intruder."""
    root = tmp_path_factory.mktemp("pki")
    module = _load_pki()
    module.make_ca(root)
    module.make_server_cert(root, root, [], [])
    for name in [*SITES, "intruder"]:
        module.make_site_key(name, root / "keys")
    return root


def descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (read from /proc before anything is killed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: ManagedProcess) -> None:
    """Hard crash: SIGKILL a launcher and everything it started, all at once."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10.0)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5,
               procs: tuple[ManagedProcess, ...] = ()) -> Any:
    """Poll ``predicate`` until truthy; fail after ``timeout`` (or as soon as one of ``procs``
    exits) with the processes' log tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(every)
    tails = "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in procs)
    pytest.fail(f"gave up waiting for {what} (limit {timeout:.0f}s)\n{tails}")


class Federation:
    """Config files and processes of one test's federation, under ``root``."""

    def __init__(self, root: Path, pki: Path) -> None:
        self.root, self.pki = root, pki
        self.port = free_port()
        self.run_dir = root / "run"
        self.procs: list[ManagedProcess] = []
        self.env = flwr_env(extra={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def write_experiment(self, *, rounds: int = 2, min_sites: int = 3, quorum_timeout_s: float = 60,
                         round_timeout_s: float = 90) -> Path:
        spec = {
            "experiment": {**TINY, "federation": {
                "strategy": "fedavg", "rounds": rounds, "local_epochs": 1, "min_sites": min_sites,
                "quorum_timeout_s": quorum_timeout_s, "round_timeout_s": round_timeout_s, "central_eval": False}},
            "sites": [{"name": n, "synthetic_centre": c, "synthetic_n": 16} for n, c in SITES.items()],
            "run_dir": str(self.run_dir),
        }
        path = self.root / "experiment.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def write_coordinator(self, **extra: Any) -> Path:
        if os.environ.get("FEDBUS_APP_DIR"):  # submit an installed copy of the app instead
            extra.setdefault("app_dir", os.environ["FEDBUS_APP_DIR"])
        conf = {"host": "127.0.0.1", "port": self.port, "state_dir": str(self.root / "coordinator"),
                "tls": {"ca_cert": str(self.pki / "ca.crt"), "server_cert": str(self.pki / "server.pem"),
                        "server_key": str(self.pki / "server.key")},
                "sites": {n: str(self.pki / "keys" / f"{n}.pub") for n in SITES}, **extra}
        path = self.root / "coordinator.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        return path

    def write_site(self, name: str, *, key: str | None = None, heartbeat_s: float | None = 10.0,
                   reconnect_timeout_s: float = 120.0, **extra: Any) -> Path:
        conf = {"site": name, "superlink": f"127.0.0.1:{self.port}",
                "ca_cert": str(self.pki / "ca.crt"), "private_key": str(self.pki / "keys" / (key or name)),
                "data": {"synthetic_centre": SITES.get(name, "SynPL"), "synthetic_n": 16},
                "state_dir": str(self.root / "sites" / name), "runtime_port": free_port(),
                "device": "cpu", "num_threads": 1,
                "tuning": {"heartbeat_s": heartbeat_s, "reconnect_timeout_s": reconnect_timeout_s},
                **extra}
        path = self.root / f"site-{name}.yaml"
        path.write_text(yaml.safe_dump(conf, sort_keys=False))
        return path

    def server(self, *args: str, name: str = "flower-server") -> ManagedProcess:
        cmd = [bin_path("flower-server"), "--config", str(self.root / "experiment.yaml"),
               "--deploy", str(self.root / "coordinator.yaml"), *args]
        proc = ManagedProcess(name, cmd, self.root / f"{name}.out", env=self.env).start()
        self.procs.append(proc)
        return proc

    def site(self, name: str, *args: str) -> ManagedProcess:
        cmd = [bin_path("flower-client"), "--site", name, "--config",
               str(self.root / f"site-{name}.yaml"), *args]
        proc = ManagedProcess(f"site-{name}", cmd, self.root / f"site-{name}.out", env=self.env).start()
        self.procs.append(proc)
        return proc

    def registered(self) -> bool:
        """flower-server has registered the sites (its output says so, or it submitted)."""
        out = self.root / "flower-server.out"
        text = out.read_text(errors="replace") if out.exists() else ""
        return "submitted" in text or all(f"registered site {n}" in text for n in SITES)

    def audit(self) -> list[dict[str, Any]]:
        path = self.root / "coordinator" / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def site_audit(self, name: str) -> list[dict[str, Any]]:
        path = self.root / "sites" / name / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def metrics(self) -> list[dict[str, str]]:
        import csv

        path = self.run_dir / "metrics.csv"
        if not path.exists():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.run_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        for proc in reversed(self.procs):  # sites before the coordinator
            proc.stop(timeout=30.0)


@pytest.fixture
def federation(tmp_path: Path, pki: Path) -> Iterator[Federation]:
    if shutil.which(bin_path("flower-superlink")) is None or not sys.platform.startswith("linux"):
        pytest.skip("needs the flower-superlink console script and Linux (/proc)")
    fed = Federation(tmp_path, pki)
    try:
        yield fed
    finally:
        fed.close()
