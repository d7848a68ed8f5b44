"""SIGTERM stops ``python -m sim.leave_center_out`` cleanly (sim/stopping.py, sim/workers.py): sent
while the second federated unit's Ray cluster runs, the process exits within a bounded time with
128 + SIGTERM, nothing it started is left running (Ray's raylet, GCS, agents and workers, the
spawn child), the finished unit stays in the run folder, and ``--resume`` completes the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pandas as pd
import pytest

from sim.stopping import end_group, group_members

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["--preset", "smoke", "--protocols", "federated", "--set", "sim.strategies=fedavg",
         "--set", "sim.centres=SynPL,SynES1,SynEG", "--set", "sim.held_out=SynPL,SynES1", "--no-progress"]
UNITS = {"fedavg__consistency__SynES1+SynEG__s0", "fedavg__consistency__SynPL+SynEG__s0"}


def session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live (not zombie) processes of session ``sid``: all that a
    process started with start_new_session=True started in turn, whatever their group."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append((int(stat.parent.name), cmdline[:120]))
    return out


def poll(predicate: Callable[[], object], limit: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"gave up waiting for {what} ({limit:.0f}s; exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def start(args: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sim.leave_center_out", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], limit: float) -> int | None:
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        return None


def assert_nothing_left(proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15  # reparented children reaped by init a moment later
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_members(proc.pid)
    for pid, _cmd in left:  # never leak them into the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert left == []


def unit_keys(folder: Path) -> set[str]:
    res = pd.read_csv(folder / "results.csv")
    return {f"{p}__{a}__{t}__s{s}" for p, a, t, s in
            res[["protocol", "arm", "train_set", "seed"]].drop_duplicates().itertuples(index=False)}


@pytest.mark.integration
@pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest -n
@pytest.mark.timeout(600)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_ray_and_leaves_a_run_that_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        proc = start([*SMOKE, "--out", str(out)], log)
        try:
            def first_unit_done() -> bool:
                results = next(out.glob("lco-*/results.csv"), None)
                return results is not None and results.stat().st_size > 0

            poll(first_unit_done, 300, "the first unit", proc, log_path)
            poll(lambda: any("raylet" in cmd for _pid, cmd in session_members(proc.pid)), 120,
                 "the second unit's Ray cluster", proc, log_path)
            proc.send_signal(signal.SIGTERM)
            code = finish(proc, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    assert_nothing_left(proc)
    text = log_path.read_text()
    folder = next(out.glob("lco-*"))
    assert f"--resume {folder}" in text
    assert len(unit_keys(folder)) == 1 and unit_keys(folder) < UNITS
    events = json.loads((folder / "provenance.json").read_text())["events"]
    assert events[-1]["event"] == "stopped" and events[-1]["signal"] == "SIGTERM" and events[-1]["units_done"] == 1
    assert not (folder / "report.md").exists()

    with open(tmp_path / "resume.log", "wb") as log:
        resumed = start(["--resume", str(folder), "--no-progress"], log)
        code = finish(resumed, 400)
        if code is None:
            resumed.kill()
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert_nothing_left(resumed)
    assert unit_keys(folder) == UNITS
    assert (folder / "report.md").is_file()
    assert [e["event"] for e in json.loads((folder / "provenance.json").read_text())["events"]][-3:] == [
        "stopped", "resume", "end"]


def test_end_group_ends_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    """SIGTERM first, SIGKILL after the grace period, for every process of the group."""
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(group_members(proc.pid)) == 2
        t0 = time.monotonic()
        assert end_group(proc.pid, grace_s=1.0) == []
        assert 1.0 <= time.monotonic() - t0 < 10  # the parent ignored SIGTERM: killed after the grace
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ValueError):
        end_group(os.getpgrp())
