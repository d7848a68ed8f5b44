"""``python -m tests.integration.hostile_site --site NAME --config SITE.yaml``: flower-client
(client/cli.py) unchanged, except that the site's warm worker loads
tests/integration/hostile_app.py instead of the installed ClientApp, through the worker's own
``--app`` option. A registered hospital that modified its code, seen from the coordinator."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client import cli, site_process

REPO = Path(__file__).resolve().parents[2]
HOSTILE_APP = "tests.integration.hostile_app:app"


class _HostileWorker(site_process.ManagedProcess):
    """ManagedProcess that adds ``--app`` to the worker's command (client/supernode.py)."""

    def __init__(self, name: str, cmd: Sequence[str], *args: Any, **kwargs: Any) -> None:
        if name.startswith("worker-"):
            cmd = [*cmd, "--app", HOSTILE_APP]
        super().__init__(name, cmd, *args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    # the worker imports tests.integration.hostile_app: the repository must be on its path
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    site_process.ManagedProcess = _HostileWorker  # type: ignore[misc]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
