"""The coordinator's audit entries read from the ServerApp's run folder: one ``round_completed``
per finished round and one ``site_failure`` per failed site, from ``metrics.csv``
(server/state.py layout: round, phase, site, metric, value)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from common.federation import AGGREGATE_SITE
from launch.audit import AuditLog


class RunFolderWatcher:
    """Turns what the ServerApp appends to ``run_dir/metrics.csv`` into audit entries: one
    ``round_completed`` per round and one ``site_failure`` per (round, phase, site) marked
    failed. Reads only new lines; a rewritten (resumed, truncated) file is re-read from the rounds not yet reported.
    ``after_round``: rounds up to it were finished by an earlier run (the checkpoint a resumed
    run starts from) and are not reported again."""

    def __init__(self, run_dir: str | Path, audit: AuditLog, run_id: int, after_round: int = 0,
                 aggregate: str = AGGREGATE_SITE) -> None:
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
