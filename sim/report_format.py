"""Cell and table formatting shared by every table of report.md (sim/report.py, sim/report_dp.py):
one rule for numbers, p-values, a metric over seeds, and GitHub markdown tables."""
from __future__ import annotations

import numpy as np
import pandas as pd


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown table of a DataFrame's (already formatted) cells."""
    if df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines) + "\n"


def seed_cell(rows: pd.DataFrame, digits: int = 3) -> str:
    """One metric's rows over seeds: 'v [lo, hi]' for one seed, 'mean ± sd (k seeds)' for more."""
    rows = rows[np.isfinite(rows["value"].astype(float))]
    if rows.empty:
        return "–"
    if len(rows) == 1:
        r = rows.iloc[0]
        return f"{fmt(r['value'], digits)} [{fmt(r['ci_low'], digits)}, {fmt(r['ci_high'], digits)}]"
    vals = rows["value"].astype(float)
    return f"{fmt(vals.mean(), digits)} ± {fmt(vals.std(ddof=1), digits)} ({len(vals)} seeds)"
