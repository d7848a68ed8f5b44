"""How a site learns that its run is over, and what its launcher does then.

Flower 1.41 tells a SuperNode nothing when a run ends: the node keeps pulling, and when the
coordinator then stops its SuperLink the node retries the connection (a warning every few
seconds) for ``--max-wait-time``. So the ServerApp ends every deployment run with one last
QUERY message whose config carries ``run-end`` (server/run_end.py). The ClientApp answers it
and writes ``<state-dir>/run-status.json``; every other message of a run writes it as
"running". ``flower-client`` (client/cli.py) watches that file with ``AfterRun``:

- ``after_run: wait`` (default): say "run N finished; waiting for the next run" once and stay
  joined. If the coordinator then stays unreachable for ``coordinator_gone_s``, stop the
  SuperNode (no retry warnings), check the coordinator every ``coordinator_probe_s`` without a
  word, and rejoin when it answers again.
- ``after_run: exit``: say so and exit 0 (after a short grace, so the answer reaches the server).

Standard library only: the launcher must not import torch or flwr.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write

logger = logging.getLogger(__name__)

STATUS_FILE = "run-status.json"
RUN_END_KEY = "run-end"  # ConfigRecord key of the server's last message; its value is the state
RUNNING = "running"
END_STATES = ("finished", "stopped", "failed")
AFTER_RUN = ("wait", "exit")

# What the launcher is asked to do by AfterRun.poll().
NOTHING, EXIT, PAUSE, RESUME = "nothing", "exit", "pause", "resume"


@dataclass(frozen=True)
class RunStatus:
    """The last run a site took part in: Flower's run id and its state at this site."""

    run_id: int
    state: str  # RUNNING or one of END_STATES

    @property
    def ended(self) -> bool:
        return self.state in END_STATES


def status_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATUS_FILE


def read_run_status(state_dir: str | Path) -> RunStatus | None:
    """The status file's content; None when missing or unreadable (it is rewritten whole)."""
    try:
        data = json.loads(status_path(state_dir).read_text(encoding="utf-8"))
        status = RunStatus(int(data["run_id"]), str(data["state"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status if status.state == RUNNING or status.ended else None


def write_run_status(state_dir: str | Path, run_id: int, state: str) -> bool:
    """Record ``state`` of run ``run_id`` (atomically); False when it was already recorded."""
    if state != RUNNING and state not in END_STATES:
        raise ValueError(f"run state {state!r} not one of {(RUNNING, *END_STATES)}")
    if read_run_status(state_dir) == RunStatus(run_id, state):
        return False  # every message of a run would otherwise rewrite the same file
    text = json.dumps({"run_id": run_id, "state": state, "time": time.time()})
    atomic_write(status_path(state_dir), lambda fh: fh.write(text + "\n"))
    return True


def note_run_state(node_config: Mapping[str, Any], run_id: int, state: str) -> bool:
    """The ClientApp's side: record the run's state where this site's launcher looks (node_config
    "state-dir"). Simulated nodes have no launcher and no state-dir: nothing is written. Never
    raises on I/O: a status file must not fail a training round (the error is logged)."""
    state_dir = node_config.get("state-dir")
    if not state_dir or "site" not in node_config:
        return False
    try:
        return write_run_status(str(state_dir), int(run_id), state)
    except OSError:
        logger.warning("site %s: could not write the run status", node_config.get("site"), exc_info=True)
        return False


class AfterRun:
    """The launcher's side, polled every supervision tick; ``poll`` returns what to do.

    ``reachable()``: whether the coordinator answers (launch/process.py coordinator_reachable);
    it is called at most every ``probe_s`` and only once a run has ended. A status present when
    the launcher starts is old news: only a change is reported."""

    def __init__(self, state_dir: str | Path, site: str, mode: str, reachable: Callable[[], bool], *,
                 gone_s: float = 60.0, probe_s: float = 15.0, exit_grace_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in AFTER_RUN:
            raise ValueError(f"after_run {mode!r} not one of {AFTER_RUN}")
        self.state_dir, self.site, self.mode, self.reachable = Path(state_dir), site, mode, reachable
        self.gone_s, self.probe_s, self.exit_grace_s, self.clock = gone_s, probe_s, exit_grace_s, clock
        self.last = read_run_status(self.state_dir)
        self.ended_at: float | None = None  # when this launcher saw the last run end
        self.unreachable_since: float | None = None
        self.paused = False  # SuperNode stopped: the coordinator went away after the run
        self.next_probe = 0.0

    def poll(self) -> str:
        now = self.clock()
        status = read_run_status(self.state_dir)
        if status is not None and status != self.last:
            self.last = status
            self._changed(status, now)
        if self.ended_at is None:
            return NOTHING
        if self.mode == "exit":
            return EXIT if now - self.ended_at >= self.exit_grace_s else NOTHING
        if now < self.next_probe:
            return NOTHING
        self.next_probe = now + self.probe_s
        up = self.reachable()
        if up:
            self.unreachable_since = None
            if self.paused:
                self.paused = False
                logger.info("site %s: the coordinator answers again; rejoining", self.site)
                return RESUME
            return NOTHING
        if self.paused:
            return NOTHING
        if self.unreachable_since is None:
            self.unreachable_since = now
        if now - self.unreachable_since < self.gone_s:
            return NOTHING
        self.paused = True
        logger.info("site %s: the coordinator has been unreachable for %.0fs since run %d ended; "
                    "SuperNode stopped, rejoining when the coordinator answers (checked every %.0fs)",
                    self.site, now - self.unreachable_since, self.last.run_id if self.last else -1,
                    self.probe_s)
        return PAUSE

    def _changed(self, status: RunStatus, now: float) -> None:
        if not status.ended:  # a new run began: back to plain supervision
            self.ended_at, self.unreachable_since = None, None
            return
        self.ended_at, self.unreachable_since, self.next_probe = now, None, now + self.probe_s
        then = "waiting for the next run" if self.mode == "wait" else "exiting (after_run: exit)"
        logger.info("site %s: run %d %s; %s", self.site, status.run_id, status.state, then)
