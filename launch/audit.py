"""Append-only, hash-chained audit log (JSON lines), written by the coordinator and by each
site's launcher.

Flower's event log is an enterprise feature, so we record what the coordinator (and a site's
launcher) can observe: sites registered/revoked/online/offline, runs submitted with their FAB
sha256, run status changes, completed rounds and site failures. Each line carries the sha256 of
the previous line, so deleting or editing a past entry breaks the chain (``verify``). The file
is opened O_APPEND and every entry is flushed and fsynced; nothing here ever rewrites it.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENESIS = "0" * 64


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (FABs, keys, run specs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AuditLog:
    """One audit file. ``append(event, **fields)`` is thread-safe within a process; use one
    writer process per file (the coordinator, or one site launcher)."""

    def __init__(self, path: str | Path, actor: str = "coordinator") -> None:
        self.path = Path(path)
        self.actor = actor
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._seq = self._tail()

    def _tail(self) -> tuple[str, int]:
        """Hash and sequence number of the last complete line (a torn last line is ignored)."""
        if not self.path.exists():
            return GENESIS, 0
        prev, seq = GENESIS, 0
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    logger.warning("%s: ignoring a torn final line", self.path)
                    break
                try:
                    seq = int(json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s: unparsable line after seq %d", self.path, seq)
                prev = _line_hash(line)
        return prev, seq

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry; returns it. Field values must be JSON-serialisable."""
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "event": event,
                "actor": self.actor,
                **fields,
                "prev": self._prev,
            }
            line = json.dumps(entry, sort_keys=False, default=str) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._prev, self._seq = _line_hash(line), entry["seq"]
        logger.debug("audit %s %s", event, fields)
        return entry


def process_identity() -> dict[str, Any]:
    """Who is acting: OS user, host and pid (recorded in start events)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "hostname": socket.gethostname(), "pid": os.getpid()}


def read(path: str | Path) -> list[dict[str, Any]]:
    """All complete entries, oldest first."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def verify(path: str | Path) -> list[str]:
    """Problems found in the chain (empty list: intact). Checks sequence numbers and that each
    entry's ``prev`` is the sha256 of the line before it."""
    problems: list[str] = []
    prev, seq = GENESIS, 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith("\n"):
                problems.append(f"{path}:{lineno}: torn final line")
                break
            try:
                entry = json.loads(line)
            except ValueError:
                problems.append(f"{path}:{lineno}: not JSON")
                prev = _line_hash(line)
                continue
            if entry.get("prev") != prev:
                problems.append(f"{path}:{lineno}: chain broken (prev hash mismatch)")
            if entry.get("seq") != seq + 1:
                problems.append(f"{path}:{lineno}: sequence {entry.get('seq')} after {seq}")
            seq = int(entry.get("seq", seq + 1))
            prev = _line_hash(line)
    return problems
