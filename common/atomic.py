"""Atomic file writes: a reader (another round, a resumed run, a second process) sees the old file
or the new one, never half of one. The bytes go to a temporary file in the same folder (same file
system, so the rename is atomic), are fsynced, then renamed over the target."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path`` (parents created), then rename it
    to ``path``; on any error the temporary file is removed and the error re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
