"""A cheap fingerprint of a site's files, so a tensor cache can never outlive its data.

A hospital that withdraws or corrects an image must never see it trained on again, even from a
cache built before the change. The fingerprint covers every file under the site folder: its
path relative to the folder, its type, size and modification time (``os.stat`` only: nothing is
opened or decoded, so it costs milliseconds for thousands of files and a FIFO cannot hang it),
plus ``READER_VERSION``, bumped whenever the readers would decode the same files differently.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

#: Bump when a reader change alters what the same files decode to (invalidates every cache).
READER_VERSION = 2


def _entries(root: Path, skip: set[Path]) -> list[str]:
    """'relpath\\0type\\0size\\0mtime_ns' per file under ``root``; dot-names are OS metadata
    and skipped (the loaders skip them too); symlinked folders are followed once."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        try:
            st = os.stat(here)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: already walked
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            try:
                s = os.stat(path)  # follows a symlink: the target's size and time count
            except OSError:
                out.append(f"{rel}\0broken")
                continue
            out.append(f"{rel}\0{stat.S_IFMT(s.st_mode)}\0{s.st_size}\0{s.st_mtime_ns}")
    return out


def files_fingerprint(path: str | Path, exclude: str | Path | None = None) -> str:
    """16 hex digits over ``READER_VERSION`` and every file under ``path`` (a folder, or the
    folder holding a manifest CSV). ``exclude``: a folder inside it not to count (a cache kept
    in the data folder would otherwise change the fingerprint by being written). A missing
    path has a fingerprint of its own (loading it fails anyway)."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    h = hashlib.sha256(f"reader-v{READER_VERSION}\0".encode())
    if not root.is_dir():
        h.update(b"absent")
        return h.hexdigest()[:16]
    skip = {Path(exclude).resolve()} if exclude is not None else set()
    for entry in _entries(root, skip):
        h.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:16]
