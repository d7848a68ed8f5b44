"""A deployment run's ``metrics.csv`` (server/state.py layout: round, phase, site, metric,
value) as a lookup table; read with the csv module so the coordinator stays free of pandas."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from common.federation import AGGREGATE_SITE
from common.fedmetrics import UNDEFINED


@dataclass
class RunMetrics:
    """metrics.csv as ``values[(round, phase, site)][metric] = value`` (UNDEFINED kept as is)."""

    values: dict[tuple[int, str, str], dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[str]]) -> RunMetrics:
        """Rows of five strings; the header, torn and malformed lines are skipped."""
        out = cls()
        for parts in rows:
            if len(parts) != 5 or parts[0] == "round":
                continue
            try:
                key, value = (int(parts[0]), parts[1], parts[2]), float(parts[4])
            except ValueError:
                continue
            out.values.setdefault(key, {})[parts[3]] = value
        return out

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            return cls()
        complete = text[: text.rfind("\n") + 1]  # a line still being appended is left for later
        return cls.from_rows(csv.reader(complete.splitlines()))

    @property
    def rounds(self) -> list[int]:
        return sorted({r for r, _, _ in self.values})

    def sites(self, phase: str | None = None) -> list[str]:
        """Site names (not the aggregate), in order of appearance."""
        return list(dict.fromkeys(s for _, p, s in self.values
                                  if s != AGGREGATE_SITE and (phase is None or p == phase)))

    def get(self, rnd: int, phase: str, site: str, metric: str) -> float | None:
        """A value, or None when missing or UNDEFINED."""
        v = self.values.get((rnd, phase, site), {}).get(metric)
        return None if v is None or v == UNDEFINED or not math.isfinite(v) else v

    def series(self, phase: str, site: str, metric: str) -> tuple[list[int], list[float]]:
        """(rounds, values) where the metric is defined."""
        pts = [(r, self.get(r, phase, site, metric)) for r in self.rounds]
        kept = [(r, v) for r, v in pts if v is not None]
        return [r for r, _ in kept], [v for _, v in kept]

    def status(self, rnd: int, site: str) -> str:
        """ok | failed | rejected (either phase) | absent."""
        cells = [self.values.get((rnd, p, site)) for p in ("train", "evaluate")]
        cells = [c for c in cells if c is not None]
        if not cells:
            return "absent"
        if any("rejected" in c for c in cells):
            return "rejected"
        return "failed" if any("failed" in c for c in cells) else "ok"

    def reasons(self, rnd: int, site: str) -> list[str]:
        """The screening checks that rejected a site's update (``rejected_<check>`` rows)."""
        return sorted({m[len("rejected_"):] for p in ("train", "evaluate")
                       for m in self.values.get((rnd, p, site), {}) if m.startswith("rejected_")})

    def round_seconds(self, rnd: int) -> float | None:
        """Train plus evaluate wall time of a round (the aggregate ``wall_seconds`` rows)."""
        parts = [self.get(rnd, p, AGGREGATE_SITE, "wall_seconds") for p in ("train", "evaluate")]
        kept = [v for v in parts if v is not None]
        return sum(kept) if kept else None
