"""Stopping a simulation run on SIGTERM or SIGINT (Ctrl-C) without orphans or half-written units.

While ``StopSignals`` is active, the first SIGTERM/SIGINT raises ``Stopped`` in the main thread,
so the run's ``finally`` blocks end the child process groups (sim/workers.py: spawn workers and
the Ray cluster of a federated unit) and the run folder is left as it is: a unit counts as done
only once its rows are in results.csv, so ``--resume`` re-runs just the unfinished ones. Inside
``held()`` (writing a unit's rows) the signal waits until the block ends. A second signal while
stopping is only logged: the cleanup it would interrupt is bounded (``end_group``).

``end_group`` ends one process group: SIGTERM to all of it, SIGKILL to what is left after a
grace period. Ray's raylet, GCS and agents inherit the group of the process that started them.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Self

log = logging.getLogger(__name__)

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The run was asked to stop by ``signum``; ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager turning SIGTERM/SIGINT into ``Stopped`` (main thread only; elsewhere it
    does nothing, as Python only lets the main thread install handlers)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._hold = 0
        self._raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            log.warning("%s while stopping: ignored, the cleanup is already under way", signal.Signals(signum).name)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping (unfinished units are re-run by --resume)",
              file=sys.stderr, flush=True)
        if not self._hold:
            self._raise()

    def _raise(self) -> None:
        assert self.signum is not None
        self._raised = True
        raise Stopped(self.signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block the signal does not interrupt; it is raised at the block's end instead."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1
        if not self._hold and self.signum is not None and not self._raised:
            self._raise()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of group ``pgid``, from /proc; elsewhere [pgid] while the
    group has any process at all."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def end_group(pgid: int, grace_s: float = 10.0, poll_s: float = 0.2) -> list[int]:
    """SIGTERM process group ``pgid``, SIGKILL what is left after ``grace_s``; returns the pids
    still alive after that (normally none). Never the caller's own group."""
    if pgid == os.getpgrp():
        raise ValueError("refusing to end this process's own group")
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not group_members(pgid):
            return []
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return []
        deadline = time.monotonic() + wait_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(poll_s)
    left = group_members(pgid)
    if left:
        log.error("process group %d: %d process(es) survived SIGKILL: %s", pgid, len(left), left)
    return left
