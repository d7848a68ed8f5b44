"""The ε-utility table of report.md: each DP arm (``<arm>-eps<ε>``) beside its arm without DP
(ε = ∞), per protocol, training set and test centre, with the ε actually spent.

A pure function of results.csv rows, like the rest of sim/report.py (whose cell format it shares,
sim/report_format.py).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sim.protocols import split_dp_arm
from sim.report_format import markdown_table, seed_cell


def _eps(value: float) -> str:
    return "∞ (no DP)" if math.isinf(value) else f"{value:g}"


def epsilon_table(results: pd.DataFrame, protocol_titles: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows: protocol × base arm × training set × test centre × target ε (ascending, ∞ last),
    for every (protocol, base arm, training set) that has at least one DP arm. Cells: Dice
    (lesion images) and AUC as 'value [95% CI]' (mean ± sd over seeds), ε spent (max over seeds)."""
    if results.empty:
        return pd.DataFrame()
    parsed = results["arm"].map(split_dp_arm)
    res = results.assign(base_arm=parsed.map(lambda t: t[0]), target_eps=parsed.map(lambda t: t[1]))
    dp_groups = res[np.isfinite(res["target_eps"].astype(float))][["protocol", "base_arm", "train_set"]].drop_duplicates()
    if dp_groups.empty:
        return pd.DataFrame()
    titles = protocol_titles or {}
    order = {p: i for i, p in enumerate(dict.fromkeys(results["protocol"]))}
    out: list[dict[str, Any]] = []
    for g in sorted(dp_groups.itertuples(index=False), key=lambda g: (order[g.protocol], g.base_arm, g.train_set)):
        sel = res[(res["protocol"] == g.protocol) & (res["base_arm"] == g.base_arm) & (res["train_set"] == g.train_set)]
        for centre in dict.fromkeys(sel["test_centre"]):
            at = sel[sel["test_centre"] == centre]
            for target in sorted(set(at["target_eps"].astype(float)), key=lambda e: (math.isinf(e), e)):
                rows = at[at["target_eps"] == target]
                spent = rows[rows["metric"] == "epsilon"]["value"].astype(float)
                n_les = rows[rows["metric"] == "dice"]["n"]
                n_all = rows[rows["metric"] == "auc"]["n"]
                out.append({
                    "protocol": titles.get(g.protocol, g.protocol),
                    "arm": g.base_arm,
                    "trained on": g.train_set,
                    "tested on": centre,
                    "target ε": _eps(target),
                    "ε spent": f"{spent.max():.2f}" if len(spent) and np.isfinite(spent).any() else "–",
                    "Dice (lesion imgs)": seed_cell(rows[rows["metric"] == "dice"]),
                    "AUC": seed_cell(rows[rows["metric"] == "auc"]),
                    "n lesion / all": f"{int(n_les.max())} / {int(n_all.max())}" if len(n_les) and len(n_all) else "–",
                })
    return pd.DataFrame(out)


def dp_section(results: pd.DataFrame, delta_note: str, protocol_titles: dict[str, str] | None = None,
               ) -> list[str]:
    """The report's lines for the ε-utility table (empty when the run has no DP arm)."""
    table = epsilon_table(results, protocol_titles)
    if table.empty:
        return []
    return [
        "## Utility cost of sample-level DP-SGD",
        "",
        "Each DP arm is its arm trained with DP-SGD (Opacus, Poisson sampling, per-image clipping) at",
        "the target ε over the unit's whole training; ε = ∞ is the same arm without DP. ε spent is the",
        f"accountant's ε after the last step ({delta_note}; federated: the largest over the sites).",
        "The guarantee is per training image, not per patient (docs/privacy.md).",
        "",
        markdown_table(table),
    ]
