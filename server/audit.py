"""Append-only, hash-chained audit log (JSON lines).

Flower's event log is an enterprise feature, so we record what the coordinator (and a site's
launcher) can observe: sites registered/revoked/online/offline, runs submitted with their FAB
sha256, run status changes, completed rounds and site failures. Each line carries the sha256 of
the previous line, so deleting or editing a past entry breaks the chain (``verify``). The file
is opened O_APPEND and every entry is flushed and fsynced; nothing here ever rewrites it.
"""
from __future__ import annotations

import csv
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


class RunFolderWatcher:
    """Turns what the ServerApp appends to ``run_dir/metrics.csv`` (server/state.py layout:
    round, phase, site, metric, value) into audit entries: one ``round_completed`` per round
    and one ``site_failure`` per (round, phase, site) marked failed. Reads only new lines; a
    rewritten (resumed, truncated) file is re-read from the rounds not yet reported.
    ``after_round``: rounds up to it were finished by an earlier run (the checkpoint a resumed
    run starts from) and are not reported again."""

    def __init__(self, run_dir: str | Path, audit: AuditLog, run_id: int, after_round: int = 0,
                 aggregate: str = "all-sites") -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.audit, self.run_id, self.aggregate = audit, run_id, aggregate
        self.after_round = after_round
        self._pos = 0
        self._reported: set[int] = set()
        self.last_round = after_round

    def poll(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self._pos:
            self._pos = 0  # file rewritten on resume
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self._pos)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._pos += len(complete.encode("utf-8"))
        rounds: dict[int, dict[str, Any]] = {}
        for parts in csv.reader(complete.splitlines()):
            if len(parts) != 5 or parts[0] == "round":
                continue
            rnd, phase, site, metric, value = int(parts[0]), parts[1], parts[2], parts[3], parts[4]
            if rnd in self._reported or rnd <= self.after_round:
                continue
            info = rounds.setdefault(rnd, {"failed": [], "sites": set(), "sites_ok": {}})
            if metric == "failed":
                info["failed"].append((phase, site))
            elif site != self.aggregate:
                info["sites"].add(site)
            elif metric == "sites_ok":
                info["sites_ok"][phase] = int(float(value))
        entries = []
        for rnd in sorted(rounds):
            info = rounds[rnd]
            for phase, site in info["failed"]:
                entries.append(self.audit.append("site_failure", run_id=self.run_id, round=rnd,
                                                 phase=phase, site=site))
            entries.append(self.audit.append(
                "round_completed", run_id=self.run_id, round=rnd, sites=sorted(info["sites"]),
                sites_ok=info["sites_ok"], failed=sorted({s for _, s in info["failed"]})))
            self._reported.add(rnd)
            self.last_round = max(self.last_round, rnd)
        return entries
