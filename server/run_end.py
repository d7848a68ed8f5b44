"""The ServerApp's last message of a deployment run: every connected site is told that the run
is over, so that its launcher can say so and wait quietly for the next run, or exit
(client/run_status.py). Flower 1.41 has no such signal: a SuperNode only notices the
coordinator going away and retries the connection for up to ``--max-wait-time``.

A QUERY whose config holds ``run-end`` (the run's end state) and nothing else; a site that
runs an older app answers it as a site query, which the server ignores.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.outcome import FederationStopped

log = logging.getLogger(__name__)

RUN_END_KEY = "run-end"  # = client/run_status.py RUN_END_KEY (the server does not import client/)
RUN_END_TIMEOUT_S = 15.0  # a connected site answers within a second; a vanished one costs this


def announce_run_end(grid: Grid, state: str, timeout: float = RUN_END_TIMEOUT_S) -> int:
    """Send the run's end ``state`` ("finished", "stopped" or "failed") to every connected
    node; returns how many answered. Never raises: the run's own outcome stands."""
    try:
        nodes = list(grid.get_node_ids())
        content = RecordDict({"config": ConfigRecord({RUN_END_KEY: state})})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    except Exception:  # e.g. the run was stopped from outside meanwhile: the outcome stands
        log.warning("could not tell the sites that the run %s", state, exc_info=True)
        return 0
    answered = sum(1 for r in replies if not r.has_error())
    log.info("run %s: told %d of %d connected site(s)", state, answered, len(nodes))
    return answered


@contextmanager
def run_end_announced(grid: Grid, enabled: bool, timeout: float = RUN_END_TIMEOUT_S) -> Iterator[None]:
    """Around a run: afterwards announce "finished", "stopped" (no quorum) or "failed" (any
    other exception, re-raised after the announcement). ``enabled`` False: nothing is sent
    (simulation: its sites have no launcher to tell)."""
    if not enabled:
        yield
        return
    state = "failed"
    try:
        yield
        state = "finished"
    except FederationStopped:
        state = "stopped"
        raise
    finally:
        announce_run_end(grid, state, timeout)
