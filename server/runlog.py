"""A run's ``server.log``: the coordinator's (and Flower's) INFO+ lines mirrored into the run
folder while the run lasts, and the loggers left as they were found afterwards."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path


def attach_run_log(run_dir: Path, names: Iterable[str] = ("server",)) -> Callable[[], None]:
    """Mirror the INFO+ lines of the loggers ``names`` into ``run_dir/server.log``; returns the
    function that detaches the file and restores each logger's level (call it in ``finally``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "server.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:  # a quiet caller still gets a complete server.log
            lg.setLevel(logging.INFO)

    def detach() -> None:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()

    return detach
