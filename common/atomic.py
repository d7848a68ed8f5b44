"""Atomic file writes, the project's only way to replace a file: a reader (another round, a resumed
run, a second process) sees the old file or the new one, never half of one, and after a power
loss the new file is there in full or not at all. The bytes go to a temporary file in the same
folder (same file system, so the rename is atomic), are fsynced, renamed over the target, and
the folder is fsynced so that the rename itself is on disk.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

_UMASK: list[int] = []  # read once: the umask can only be read by setting it


def _new_file_mode() -> int:
    """Permission bits ``open(path, "w")`` would give a new file: 0666 minus the umask."""
    if not _UMASK:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK.append(mask)
    return 0o666 & ~_UMASK[0]


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk. Best effort: some file
    systems and platforms cannot open or fsync a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False,
                 mode: int | None = 0o600) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path`` (parents created), then rename it
    to ``path``; on any error the temporary file is removed and the error re-raised. Text is
    UTF-8 and written as given (no newline translation). ``mode``: permission bits of the file,
    private by default (site caches hold patient images); None: those a plain ``open`` would
    give it (0666 minus the umask), for results meant to be shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), _new_file_mode() if mode is None else mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
