"""Site identity bound to its key: the site name a node claims in the query round must be the
name its public key was registered under.

With node authentication the SuperLink knows each node by its key, and a reply's
``metadata.src_node_id`` is that authenticated node id; the name the node reports is only what
its site YAML says. flower-server (server/coordinator.py) writes the SuperLink's registry
(node id → registered name) into the run folder as ``site_registry.json``, and the ServerApp
refuses a node whose claimed name differs. Without the file (simulation, or an insecure
SuperLink that has no keys) the check is off.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write

log = logging.getLogger(__name__)

REGISTRY_FILE = "site_registry.json"


@dataclass(frozen=True)
class Refusal:
    """A node refused in the query round: what it claimed and what its key is registered as
    (None: its node id is not in the registry)."""

    node_id: int
    claimed: str
    registered: str | None

    @property
    def reason(self) -> str:
        if self.registered is None:
            return f"node {self.node_id} claims site {self.claimed!r} but has no registered key"
        return (f"node {self.node_id} claims site {self.claimed!r} but its key is registered "
                f"as {self.registered!r}")


def write_site_registry(run_dir: str | Path, names: Mapping[int, str], audit_log: str | Path | None) -> Path:
    """Write ``run_dir/site_registry.json``: {"nodes": {node id: name}, "audit_log": path}
    (node ids as strings: JSON keys; 64-bit ids would lose digits as JSON numbers in other readers)."""
    doc = {"nodes": {str(int(n)): str(name) for n, name in sorted(names.items())},
           "audit_log": None if audit_log is None else str(Path(audit_log).resolve())}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write(Path(run_dir) / REGISTRY_FILE, lambda fh: fh.write(text), mode=None)


def remove_site_registry(run_dir: str | Path) -> None:
    """Remove a registry left by an earlier run (a run without node authentication has none)."""
    (Path(run_dir) / REGISTRY_FILE).unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[int, str], str | None]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return {int(k): str(v) for k, v in dict(doc.get("nodes", {})).items()}, doc.get("audit_log")


class IdentityCheck:
    """The registry of one run folder. ``registered(node)`` re-reads the file when a node id
    is unknown (the coordinator rewrites it when a key is registered during the run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names, self.audit_log = _read(path)
        self.refusals: list[Refusal] = []

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> IdentityCheck | None:
        """The run folder's registry, or None (check off) when there is none."""
        path = Path(run_dir) / REGISTRY_FILE
        if not path.is_file():
            log.warning("no %s in %s: site names are not checked against registered keys", REGISTRY_FILE, run_dir)
            return None
        check = cls(path)
        log.info("site names checked against %d registered key(s)", len(check.names))
        return check

    def registered(self, node_id: int) -> str | None:
        if node_id not in self.names and self.path.is_file():
            self.names, self.audit_log = _read(self.path)
        return self.names.get(node_id)

    def check(self, node_id: int, claimed: str) -> Refusal | None:
        """None when ``claimed`` is the node's registered name; else the refusal, logged, kept
        in ``refusals`` and audited (``site_identity_refused``) when the registry names a log."""
        registered = self.registered(node_id)
        if registered == claimed:
            return None
        refusal = Refusal(node_id, claimed, registered)
        log.error("%s: refused", refusal.reason)
        self.refusals.append(refusal)
        if self.audit_log:
            from launch.audit import AuditLog

            try:
                AuditLog(self.audit_log, actor="serverapp").append(
                    "site_identity_refused", node_id=node_id, claimed=claimed, registered=registered)
            except OSError as exc:  # the refusal stands; only its audit entry is lost
                log.error("could not audit the refusal of node %d: %s", node_id, exc)
        return refusal

    def drain(self) -> list[Refusal]:
        out, self.refusals = self.refusals, []
        return out
