"""server/run_end.py with the real ClientApp over the in-process grid: every connected
deployment site notes how the run ended in its state folder, for its launcher."""
from __future__ import annotations

from pathlib import Path

import pytest

from client.app import make_client_app
from client.run_status import RunStatus, read_run_status
from server.app import FederationStopped
from server.run_end import announce_run_end, run_end_announced
from tests.server.local_grid import LocalGrid


def _grid(tmp_path: Path) -> LocalGrid:
    nodes = {n: {"site": name, "state-dir": str(tmp_path / name), "synthetic-centre": "SynPL",
                 "synthetic-n": 8} for n, name in ((11, "udiat"), (12, "busi"), (13, "uclm"))}
    return LocalGrid(make_client_app(), nodes)


def test_every_connected_site_notes_the_end(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    grid.offline.add(13)
    assert announce_run_end(grid, "finished") == 2
    assert read_run_status(tmp_path / "udiat") == RunStatus(1, "finished")
    assert read_run_status(tmp_path / "busi") == RunStatus(1, "finished")
    assert read_run_status(tmp_path / "uclm") is None  # not connected: not told
    reply = grid.replies[0].content.config_records["info"]
    assert dict(reply) == {"run-end-noted": True}  # nothing else leaves the site


def test_the_state_follows_the_runs_outcome(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    with run_end_announced(grid, enabled=True):
        pass
    assert read_run_status(tmp_path / "busi").state == "finished"
    with pytest.raises(FederationStopped), run_end_announced(grid, enabled=True):
        raise FederationStopped("no quorum")
    assert read_run_status(tmp_path / "busi").state == "stopped"
    with pytest.raises(ZeroDivisionError), run_end_announced(grid, enabled=True):
        raise ZeroDivisionError
    assert read_run_status(tmp_path / "busi").state == "failed"
    sent = len(grid.sent)
    with run_end_announced(grid, enabled=False):  # simulation: nobody to tell
        pass
    assert len(grid.sent) == sent


def test_a_grid_failure_does_not_mask_the_run(tmp_path: Path) -> None:
    grid = _grid(tmp_path)

    def broken(_messages: object) -> None:
        raise RuntimeError("run was stopped")

    grid.before_send = broken
    assert announce_run_end(grid, "finished") == 0
    with pytest.raises(FederationStopped), run_end_announced(grid, enabled=True):
        raise FederationStopped("no quorum")


def test_any_message_of_a_new_run_marks_it_running(tmp_path: Path) -> None:
    grid = _grid(tmp_path)
    announce_run_end(grid, "finished")
    grid.contexts[11].run_id = 2
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    query = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=11)
    grid.send_and_receive([query])  # fails at the site (no experiment), but the run has begun
    assert read_run_status(tmp_path / "udiat") == RunStatus(2, "running")
    assert read_run_status(tmp_path / "busi") == RunStatus(1, "finished")
