"""The coordinator's view of the ServerApp's run folder, from ``metrics.csv`` (server/state.py
layout: round, phase, site, metric, value): audit entries (one ``round_completed`` per finished
round, one ``site_failure`` per failed site), a one-line console summary per round and the run's
``report.md`` with plots (server/report.py), rewritten as rounds finish and when the run ends."""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from common.federation import AGGREGATE_SITE
from launch.audit import AuditLog
from server.report import RunMetrics, eta_seconds, summary_line, total_rounds, write_report

log = logging.getLogger(__name__)


class RunFolderWatcher:
    """Turns what the ServerApp appends to ``run_dir/metrics.csv`` into audit entries: one
    ``round_completed`` per round and one ``site_failure`` per (round, phase, site) marked
    failed. Reads only new lines; a rewritten (resumed, truncated) file is re-read from the rounds not yet reported.
    ``after_round``: rounds up to it were finished by an earlier run (the checkpoint a resumed
    run starts from) and are not reported again. ``total_rounds``: for "round k/N" and the ETA
    (default: the run's config.yaml); ``console``: where the summary lines go (None: stdout);
    ``summary``/``report``: False leaves the summary lines / report.md and its plots out."""

    def __init__(self, run_dir: str | Path, audit: AuditLog, run_id: int, after_round: int = 0,
                 aggregate: str = AGGREGATE_SITE, total_rounds: int | None = None,
                 console: TextIO | None = None, summary: bool = True, report: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.audit, self.run_id, self.aggregate = audit, run_id, aggregate
        self.after_round = after_round
        self.total_rounds, self.console = total_rounds, console
        self.summary, self.report = summary, report
        self._pos, self._file = 0, (0, 0)
        self._reported: set[int] = set()
        self._state: str | None = None
        self.last_round = after_round

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except OSError:
            return []
        if (st.st_dev, st.st_ino) != self._file or st.st_size < self._pos:
            self._pos, self._file = 0, (st.st_dev, st.st_ino)  # rewritten (atomically) on resume
        with open(self.path, "rb") as fh:  # bytes: csv rows end in \r\n, text mode would miscount
            fh.seek(self._pos)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self._pos += end
        complete = chunk[:end].decode("utf-8", errors="replace")
        rounds: dict[int, dict[str, Any]] = {}
        for parts in csv.reader(complete.splitlines()):
            if len(parts) != 5 or parts[0] == "round":
                continue
            try:  # a malformed row is skipped, as RunMetrics.from_rows does: never crash the coordinator
                rnd = int(parts[0])
            except ValueError:
                continue
            phase, site, metric, value = parts[1], parts[2], parts[3], parts[4]
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
        self._show(sorted(rounds))
        return entries

    def _show(self, new_rounds: list[int]) -> None:
        """Summary lines for ``new_rounds``, and the report when a round finished or the run's
        state changed (its end). Never raises: the report is for the operator, the run goes on."""
        state = _run_state(self.run_dir)
        if not new_rounds and state == self._state:
            return
        self._state = state
        try:
            metrics = RunMetrics.read(self.path)
            if self.total_rounds is None:
                self.total_rounds = total_rounds(self.run_dir)
            for rnd in new_rounds:
                if self.summary:
                    eta = eta_seconds(metrics, rnd, self.total_rounds, self.after_round)
                    print(summary_line(metrics, rnd, self.total_rounds, eta),
                          file=self.console or sys.stdout, flush=True)
            if self.report and (metrics.rounds or state is not None):
                write_report(self.run_dir, self.total_rounds, metrics)
        except Exception as exc:  # noqa: BLE001  a plotting or disk problem must not stop the run
            log.warning("run report of %s not written: %s", self.run_dir, exc)


def _run_state(run_dir: Path) -> str | None:
    """status.json's ``state`` (running, finished, stopped, failed), or None before it exists."""
    try:
        return str(json.loads((run_dir / "status.json").read_text(encoding="utf-8")).get("state"))
    except (OSError, ValueError, AttributeError):
        return None
