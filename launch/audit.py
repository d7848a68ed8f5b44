"""Append-only, hash-chained, keyed audit log (JSON lines), written by the coordinator and by each
site's launcher, worker and ClientApp.

Flower's event log is an enterprise feature, so we record what the coordinator (and a site's
launcher) can observe: sites registered/revoked/online/offline, runs submitted with their FAB
sha256, run status changes, completed rounds, site failures and privacy refusals.

Tamper evidence, three layers (``verify`` checks all of them):
- each line carries the sha256 of the previous line (``prev``), so removing or reordering a past
  entry breaks the chain;
- each line ends with an HMAC-SHA256 (``mac``) of the rest of the line under a secret key kept
  beside the log (``audit.key``, created 0600), so an edited line cannot be re-hashed into place
  by someone who can write the log but not read the key;
- an anchor file beside the log (``audit.anchor``: entry count and the last line's hash, with its
  own HMAC) is replaced atomically after every append, so deleting the last lines is detected
  ("truncated: N entries, anchor says M").
Whoever can read the key can rewrite everything: keep the state folder to the service's user.

Writers in several processes share one file (a site's launcher, worker and ClientApp): each
append holds an exclusive ``flock`` on the log and re-reads the tail when another process
appended since. The file is opened O_APPEND and every entry is fsynced; nothing rewrites it.

    python -m launch.audit verify STATE/audit.jsonl   # "audit log OK (N entries)", exit 0; else 1
"""
from __future__ import annotations

import argparse
import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.atomic import atomic_write

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
_MAC_TAIL = re.compile(r', "mac": "([0-9a-f]{64})"\}$')


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode("utf-8")).hexdigest()


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def key_path(log: str | Path) -> Path:
    """The HMAC key beside ``log`` (audit.jsonl → audit.key)."""
    return Path(log).with_suffix(".key")


def anchor_path(log: str | Path) -> Path:
    """The anchor file beside ``log`` (audit.jsonl → audit.anchor)."""
    return Path(log).with_suffix(".anchor")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (FABs, keys, run specs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_or_create_key(path: Path) -> bytes:
    """The log's HMAC key; created (32 random bytes, hex, mode 0600) on first use. Called with
    the log's flock held, so two processes never both create it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & 0o077:
            logger.warning("%s: audit key readable by others (mode %o); chmod 600 it", path, mode & 0o777)
        return path.read_bytes().strip()
    text = secrets.token_hex(32).encode("ascii")
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    return text


def _anchor_mac(key: bytes, entries: int, head: str) -> str:
    return _mac(key, f"{entries}:{head}")


class AuditLog:
    """One audit file. ``append(event, **fields)`` is thread-safe and, through ``flock``, safe
    across processes that share the file."""

    def __init__(self, path: str | Path, actor: str = "coordinator") -> None:
        self.path = Path(path)
        self.actor = actor
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._seq, self._size = GENESIS, 0, -1  # -1: read the tail on first append

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
        """Write one entry (and the anchor); returns it. Field values must be JSON-serialisable."""
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size != self._size:  # first append, or another process appended since
                    self._prev, self._seq = self._tail()
                key = _load_or_create_key(key_path(self.path))
                entry: dict[str, Any] = {
                    "seq": self._seq + 1,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "event": event,
                    "actor": self.actor,
                    **{k: v for k, v in fields.items() if k not in ("mac", "prev")},
                    "prev": self._prev,
                }
                body = json.dumps(entry, sort_keys=False, default=str)
                line = f'{body[:-1]}, "mac": "{_mac(key, body)}"}}\n'
                data = line.encode("utf-8")
                os.write(fd, data)
                os.fsync(fd)
                self._prev, self._seq, self._size = _line_hash(line), entry["seq"], size + len(data)
                anchor = {"entries": entry["seq"], "head": self._prev,
                          "mac": _anchor_mac(key, entry["seq"], self._prev)}
                atomic_write(anchor_path(self.path), lambda fh: fh.write(json.dumps(anchor) + "\n"))
            finally:
                os.close(fd)  # releases the flock
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


def _read_key(path: Path) -> bytes | None:
    try:
        return key_path(path).read_bytes().strip()
    except FileNotFoundError:
        return None


def verify(path: str | Path) -> list[str]:
    """Problems found (empty list: intact), first bad line first: sequence numbers, each entry's
    ``prev`` against the sha256 of the line before, each line's HMAC, and the entry count and
    head hash against the anchor. A log one entry ahead of its anchor is accepted (a crash
    between the append and the anchor's replacement); behind it is a truncation."""
    path = Path(path)
    problems: list[str] = []
    key = _read_key(path)
    if key is None:
        problems.append(f"{key_path(path)}: key missing (HMACs cannot be checked)")
    hashes: list[str] = []
    prev, seq = GENESIS, 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith("\n"):
                problems.append(f"{path}:{lineno}: torn final line")
                break
            hashes.append(_line_hash(line))
            try:
                entry = json.loads(line)
            except ValueError:
                problems.append(f"{path}:{lineno}: not JSON")
                prev = hashes[-1]
                continue
            if not isinstance(entry, dict):
                problems.append(f"{path}:{lineno}: not a JSON object")
                prev = hashes[-1]
                continue
            if entry.get("prev") != prev:
                problems.append(f"{path}:{lineno}: chain broken (prev hash mismatch)")
            if entry.get("seq") != seq + 1:
                problems.append(f"{path}:{lineno}: sequence {entry.get('seq')} after {seq}")
            mac = _MAC_TAIL.search(line.rstrip("\n"))
            if mac is None:
                problems.append(f"{path}:{lineno}: no HMAC")
            elif key is not None:
                body = line.rstrip("\n")[: mac.start()] + "}"
                if not hmac.compare_digest(_mac(key, body), mac.group(1)):
                    problems.append(f"{path}:{lineno}: HMAC mismatch (entry edited)")
            seq = entry["seq"] if isinstance(entry.get("seq"), int) else seq + 1
            prev = hashes[-1]
    problems += _check_anchor(path, key, hashes)
    return problems


def _check_anchor(path: Path, key: bytes | None, hashes: list[str]) -> list[str]:
    apath = anchor_path(path)
    try:
        anchor = json.loads(apath.read_text(encoding="utf-8"))
        entries, head, mac = int(anchor["entries"]), str(anchor["head"]), str(anchor["mac"])
    except FileNotFoundError:
        return [f"{apath}: anchor missing (truncation cannot be ruled out)"]
    except (ValueError, KeyError, TypeError):
        return [f"{apath}: anchor unreadable"]
    if key is not None and not hmac.compare_digest(_anchor_mac(key, entries, head), mac):
        return [f"{apath}: anchor HMAC mismatch (anchor edited)"]
    n = len(hashes)
    if n < entries:
        return [f"{path}: truncated: {n} entries, anchor says {entries}"]
    if entries > 0 and hashes[entries - 1] != head:
        return [f"{path}:{entries}: does not match the anchor's head hash"]
    if n > entries + 1:
        return [f"{path}: {n} entries but the anchor says {entries} (anchor not updated)"]
    return []


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.audit verify LOG``: exit 0 and "audit log OK (N entries)", 1 with the
    problems, 2 when the log cannot be read."""
    p = argparse.ArgumentParser(prog="python -m launch.audit", description="Check an audit log.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check the chain, the HMACs and the anchor")
    v.add_argument("log", type=Path)
    args = p.parse_args(argv)
    try:
        problems = verify(args.log)
        with open(args.log, encoding="utf-8") as fh:
            n = sum(1 for line in fh if line.endswith("\n"))
    except (OSError, ValueError) as exc:
        print(f"audit: cannot read {args.log}: {exc}", file=sys.stderr)
        return 2
    if problems:
        print(*problems, sep="\n", file=sys.stderr)
        print(f"audit log FAILED verification ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"audit log OK ({n} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
