"""client/run_status.py: the status file the ClientApp writes and what the launcher makes of it
(say the run ended once; wait, pause while the coordinator is gone, rejoin, or exit)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from client.run_status import (
    EXIT,
    NOTHING,
    PAUSE,
    RESUME,
    AfterRun,
    RunStatus,
    note_run_state,
    read_run_status,
    status_path,
    write_run_status,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Coordinator:
    """The coordinator as the probe sees it; counts probes."""

    def __init__(self) -> None:
        self.up, self.probes = True, 0

    def __call__(self) -> bool:
        self.probes += 1
        return self.up


def _watcher(tmp_path: Path, mode: str = "wait") -> tuple[AfterRun, Clock, Coordinator]:
    clock, coord = Clock(), Coordinator()
    return AfterRun(tmp_path, "udiat", mode, coord, gone_s=60.0, probe_s=15.0, exit_grace_s=5.0,
                    clock=clock), clock, coord


def test_status_file_round_trip_and_unchanged_writes_are_skipped(tmp_path: Path) -> None:
    assert read_run_status(tmp_path) is None
    assert write_run_status(tmp_path, 7, "running")
    assert not write_run_status(tmp_path, 7, "running")  # same content: not rewritten
    assert write_run_status(tmp_path, 7, "finished")
    assert read_run_status(tmp_path) == RunStatus(7, "finished") and read_run_status(tmp_path).ended
    status_path(tmp_path).write_text('{"run_id": 7, "state": "exploded"}')
    assert read_run_status(tmp_path) is None  # an unknown state is no status
    status_path(tmp_path).write_text("{half")
    assert read_run_status(tmp_path) is None
    with pytest.raises(ValueError, match="run state"):
        write_run_status(tmp_path, 7, "done")


def test_only_deployment_nodes_with_a_state_dir_write_it(tmp_path: Path) -> None:
    assert not note_run_state({"partition-id": 0, "num-partitions": 3}, 1, "running")  # simulation
    assert not note_run_state({"site": "udiat"}, 1, "running")
    assert note_run_state({"site": "udiat", "state-dir": str(tmp_path)}, 1, "finished")
    assert read_run_status(tmp_path) == RunStatus(1, "finished")


def test_wait_says_the_run_ended_once_then_pauses_and_rejoins(tmp_path: Path, caplog) -> None:
    write_run_status(tmp_path, 3, "finished")  # an earlier run: old news at start
    watcher, clock, coord = _watcher(tmp_path)
    caplog.set_level(logging.INFO, logger="client.run_status")
    assert watcher.poll() == NOTHING and coord.probes == 0
    write_run_status(tmp_path, 4, "running")
    assert watcher.poll() == NOTHING
    write_run_status(tmp_path, 4, "finished")
    actions = []
    for _ in range(10):  # 5 s of 0.5-s ticks: said once, nobody probed yet
        actions.append(watcher.poll())
        clock.now += 0.5
    assert set(actions) == {NOTHING} and coord.probes == 0
    said = [r.getMessage() for r in caplog.records]
    assert said == ["site udiat: run 4 finished; waiting for the next run"]
    clock.now += 10.0
    assert watcher.poll() == NOTHING and coord.probes == 1  # up: stay joined
    coord.up = False
    timeline = []
    for _ in range(6):  # probes at +15 s steps: unreachable from the first, gone after 60 s
        clock.now += 15.0
        timeline.append(watcher.poll())
    assert timeline == [NOTHING, NOTHING, NOTHING, NOTHING, PAUSE, NOTHING]
    assert watcher.paused and len(caplog.records) == 2
    for _ in range(20):  # paused: quiet, one probe per 15 s
        clock.now += 15.0
        assert watcher.poll() == NOTHING
    assert len(caplog.records) == 2 and coord.probes == 1 + 6 + 20
    coord.up = True
    clock.now += 15.0
    assert watcher.poll() == RESUME and not watcher.paused


def test_a_blip_shorter_than_the_bound_does_not_pause(tmp_path: Path) -> None:
    watcher, clock, coord = _watcher(tmp_path)
    write_run_status(tmp_path, 1, "finished")
    watcher.poll()
    coord.up = False
    for _ in range(3):  # 45 s unreachable
        clock.now += 15.0
        assert watcher.poll() == NOTHING
    coord.up = True
    clock.now += 15.0
    assert watcher.poll() == NOTHING
    coord.up = False
    for _ in range(4):  # the clock restarted at the blip's end: 60 s from here, not from before
        clock.now += 15.0
        assert watcher.poll() == NOTHING
    clock.now += 15.0
    assert watcher.poll() == PAUSE


def test_a_new_run_ends_the_after_run_watch(tmp_path: Path) -> None:
    watcher, clock, coord = _watcher(tmp_path)
    write_run_status(tmp_path, 1, "stopped")
    watcher.poll()
    write_run_status(tmp_path, 2, "running")
    coord.up = False
    for _ in range(10):  # mid-run outages are the SuperNode's own reconnect business
        clock.now += 15.0
        assert watcher.poll() == NOTHING
    assert coord.probes == 0


def test_exit_mode_exits_after_the_grace(tmp_path: Path, caplog) -> None:
    watcher, clock, _coord = _watcher(tmp_path, "exit")
    caplog.set_level(logging.INFO, logger="client.run_status")
    write_run_status(tmp_path, 9, "failed")
    assert watcher.poll() == NOTHING
    clock.now += 4.9
    assert watcher.poll() == NOTHING
    clock.now += 0.2
    assert watcher.poll() == EXIT
    assert [r.getMessage() for r in caplog.records] == ["site udiat: run 9 failed; exiting (after_run: exit)"]
    with pytest.raises(ValueError, match="after_run"):
        AfterRun(tmp_path, "udiat", "linger", lambda: True)
