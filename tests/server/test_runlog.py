"""server/runlog.py: server.log gets the run's lines, and the loggers are left as they were."""
from __future__ import annotations

import logging
from pathlib import Path

from server.runlog import attach_run_log


def test_run_log_collects_info_lines_and_restores_levels(tmp_path: Path) -> None:
    server, flwr = logging.getLogger("server"), logging.getLogger("flwr")
    before = (server.level, flwr.level, len(server.handlers), len(flwr.handlers))
    server.setLevel(logging.WARNING)  # a quiet caller
    try:
        detach = attach_run_log(tmp_path / "run", ("server", "flwr"))
        logging.getLogger("server.app").info("round 1 done")
        flwr.info("flower line")
        detach()
        logging.getLogger("server.app").warning("after the run")
        text = (tmp_path / "run" / "server.log").read_text(encoding="utf-8")
        assert "round 1 done" in text and "flower line" in text and "after the run" not in text
        assert server.level == logging.WARNING and flwr.level == before[1]
        assert (len(server.handlers), len(flwr.handlers)) == before[2:]
    finally:
        server.setLevel(before[0])
