"""Timing knobs of flwr 1.41 that only our own entry points change (client/supernode.py,
server/serverapp_exec.py, server/superlink.py); the stock console scripts and the wire protocol stay untouched.

Each patch replaces one module attribute that the flwr 1.41.0 source binds at import time
(a ``time`` module reference, a constant, a function with a default argument), so it affects
only the module named and only the process that applies it. Sources:
``supernode/start_client_internal.py`` (idle pull sleep 3 s, reply poll 0.5 s),
``superlink/grid/http_grid.py`` (reply poll 3 s), ``supercore/inflatable/inflatable_utils.py``
(first object-pull retry after 1 s), ``supercore/heartbeat.py`` (30 s heartbeat).
"""
from __future__ import annotations

import logging
import time
import types
from typing import Any

logger = logging.getLogger(__name__)

TESTED_FLWR = "1.41.0"  # the patched attributes below were read in this version's source


class ShortSleeps(types.ModuleType):
    """Stand-in for the ``time`` module inside one flwr module: idle waits (>= 1 s) become
    ``idle_s``, short polls become at most ``short_s``; everything else is the real ``time``."""

    def __init__(self, idle_s: float, short_s: float) -> None:
        super().__init__("time")
        self.idle_s, self.short_s = idle_s, short_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds >= 1.0 else min(seconds, self.short_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_flwr_version() -> None:
    import flwr

    if flwr.__version__ != TESTED_FLWR:
        logger.warning("timing patches were written for flwr %s, found %s: verify them",
                       TESTED_FLWR, flwr.__version__)


def patch_heartbeat(interval_s: float | None) -> None:
    """Heartbeat interval this process announces and keeps (Flower default 30 s; the SuperLink
    declares a node dead after 2 missed intervals)."""
    if not interval_s:
        return
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fhc

    hb.HEARTBEAT_DEFAULT_INTERVAL = fhc.HEARTBEAT_DEFAULT_INTERVAL = float(interval_s)  # type: ignore[attr-defined]


def patch_object_pulls(module: types.ModuleType, attr: str, initial_backoff_s: float = 0.05,
                       backoff_cap_s: float = 1.0) -> None:
    """Object pulls retry a not-yet-pushed object after 1 s, doubling to 10 s (flwr's
    PULL_INITIAL_BACKOFF, bound as a default argument): start ``module.attr`` at
    ``initial_backoff_s`` instead. Every receiver of a message hits this once per message,
    because senders push the message before its objects."""
    import functools

    original = getattr(module, attr)
    if isinstance(original, functools.partial):
        return  # already patched
    setattr(module, attr, functools.partial(original, initial_backoff=initial_backoff_s,
                                            backoff_cap=backoff_cap_s))


def configure_flwr_logging() -> None:
    """Timestamps on and colours off in flwr's console output (it ends up in log files)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=False)


def patch_superlink_object_store() -> None:
    """Keep the SuperLink's message payloads (the ObjectStore) in memory while its LinkState
    (nodes, runs, messages) stays in the ``--database`` SQLite file. With ``--database`` flwr
    puts both in SQLite (``superlink/config_loader.py``), which costs several SQL statements
    per model array per message; payloads of an interrupted run are never reused (a resumed
    run is a new run), so they need not survive a restart."""
    check_flwr_version()
    import flwr.superlink.config_loader as config_loader
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    original = config_loader.get_objectstore_linkstate_factories

    def factories(database: str, federation_manager: Any) -> tuple[Any, Any]:
        if database == FLWR_IN_MEMORY_DB_NAME or config_loader._is_non_sqlite_database_url(database):
            return original(database, federation_manager)
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = factories  # type: ignore[attr-defined]
