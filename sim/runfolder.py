"""One experiment invocation's folder (``common.runfolder.RunFolder``) with its unit bookkeeping.

A *unit* is one training job: protocol × arm × train set × seed. Its rows go into
``per_image.csv`` and ``curves.csv`` first and into ``results.csv`` last, each file rewritten
atomically; a unit counts as complete only once its rows are in ``results.csv``, so a run
stopped at any point resumes by re-running just the incomplete units (their stray rows in the
other files are dropped first).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.runfolder import RunFolder

logger = logging.getLogger(__name__)

#: Tidy layout of results.csv: one row per unit × test centre × metric.
RESULT_COLUMNS: tuple[str, ...] = (
    "protocol", "arm", "train_set", "test_centre", "seed", "metric", "value", "ci_low", "ci_high", "n",
)
#: Columns that identify a unit inside every table of the run folder.
UNIT_COLUMNS: tuple[str, ...] = ("protocol", "arm", "train_set", "seed")


@dataclass(frozen=True)
class Unit:
    """One training job; ``train_set`` is the training centres joined with '+'."""

    protocol: str
    arm: str
    train_set: str
    seed: int

    @property
    def key(self) -> str:
        """Filesystem-safe identifier, e.g. ``paper__consistency__BrEaST__s0``."""
        raw = f"{self.protocol}__{self.arm}__{self.train_set}__s{self.seed}"
        return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in raw)

    def columns(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "arm": self.arm, "train_set": self.train_set, "seed": self.seed}


def _unit_keys(df: pd.DataFrame) -> pd.Series:
    if df.empty:
        return pd.Series([], dtype=str)
    return df.apply(
        lambda r: Unit(str(r["protocol"]), str(r["arm"]), str(r["train_set"]), int(r["seed"])).key, axis=1
    )


class SimRunFolder(RunFolder):
    """``runs/lco-YYYYmmdd-HHMMSS/`` with results.csv, per_image.csv, curves.csv, config.yaml,
    provenance.json, report.md, figures (*.png) and examples/ (overlay arrays per unit)."""

    PREFIX = "lco"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.examples_dir = self.path / "examples"

    def prepare(self) -> None:
        self.examples_dir.mkdir(exist_ok=True)

    # -- files ------------------------------------------------------------------------------
    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def per_image_csv(self) -> Path:
        return self.path / "per_image.csv"

    @property
    def curves_csv(self) -> Path:
        return self.path / "curves.csv"

    def read(self, name: str) -> pd.DataFrame:
        """One of the tidy tables ("results", "per_image", "curves"); empty when absent."""
        path = self.path / f"{name}.csv"
        if not path.is_file() or path.stat().st_size == 0:
            return pd.DataFrame(columns=list(RESULT_COLUMNS) if name == "results" else list(UNIT_COLUMNS))
        return pd.read_csv(path, keep_default_na=True)

    # -- units ------------------------------------------------------------------------------
    def completed_units(self) -> set[str]:
        """Keys of units whose rows are in results.csv."""
        return set(_unit_keys(self.read("results")))

    def drop_incomplete(self) -> None:
        """Remove rows of units that never reached results.csv (a run stopped mid-unit)."""
        done = self.completed_units()
        for name in ("per_image", "curves"):
            df = self.read(name)
            if df.empty:
                continue
            keep = _unit_keys(df).isin(done).to_numpy()
            if not keep.all():
                logger.info("%s: dropping %d rows of incomplete units", name, int((~keep).sum()))
                self.write_text(f"{name}.csv", df[keep].to_csv(index=False))

    def write_unit(
        self,
        unit: Unit,
        results: pd.DataFrame,
        per_image: pd.DataFrame | None = None,
        curves: pd.DataFrame | None = None,
    ) -> None:
        """Append one unit's rows to each table (atomic rewrites; results.csv last = commit)."""
        missing = set(RESULT_COLUMNS) - set(results.columns)
        if missing:
            raise ValueError(f"results for {unit.key} lack columns {sorted(missing)}")
        for name, new in (("per_image", per_image), ("curves", curves), ("results", results)):
            if new is None or new.empty:
                continue
            new = new.assign(**unit.columns()) if name != "results" else new
            old = self.read(name)
            if not old.empty:
                old = old[_unit_keys(old) != unit.key]
            table = new if old.empty else pd.concat([old, new], ignore_index=True)
            if name == "results":
                table = table[list(RESULT_COLUMNS)]
            else:
                front = [c for c in UNIT_COLUMNS if c in table.columns]
                table = table[front + [c for c in table.columns if c not in front]]
            self.write_text(f"{name}.csv", table.to_csv(index=False))
