"""The ε-utility table of report.md and the points of its plot: each DP arm (``<arm>-eps<ε>``)
beside its arm without DP (ε = ∞), per protocol, training set and test centre, with the ε
actually spent.

Pure functions of results.csv rows, like the rest of sim/report.py (whose cell format it shares,
sim/report_format.py). ``python -m sim.report_dp RUN_DIR ... --out PREFIX`` draws the plot of
finished runs (several runs: one public centre each, or one ε each) into PREFIX.png / PREFIX.csv.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sim.protocols import dp_arm, split_dp_arm
from sim.report_format import markdown_table, seed_cell


def _eps(value: float) -> str:
    return "∞ (no DP)" if math.isinf(value) else f"{value:g}"


def _with_eps(results: pd.DataFrame) -> pd.DataFrame:
    parsed = results["arm"].map(split_dp_arm)
    return results.assign(base_arm=parsed.map(lambda t: t[0]), target_eps=parsed.map(lambda t: float(t[1])))


def _without_dp(arms: pd.Series) -> pd.Series:
    """True for each arm name without a DP suffix (ε = ∞)."""
    return arms.map(lambda a: math.isinf(split_dp_arm(a)[1]))


def label_private_run(results: pd.DataFrame, privacy: dict[str, Any]) -> pd.DataFrame:
    """``results`` of a run with ``privacy.enabled`` for every arm (one ε per run, no ``-eps``
    arms) with each arm that spent ε renamed ``<arm>-eps<target ε>``, so that it reads as DP,
    not as ε = ∞. ``privacy``: the run's config.yaml section."""
    target = float(privacy.get("target_epsilon") or math.inf)
    if results.empty or not privacy.get("enabled") or not math.isfinite(target):
        return results
    keys = ["protocol", "arm", "train_set", "seed"]
    spent = results[(results["metric"] == "epsilon") & results["value"].notna()][keys].drop_duplicates()
    private = results[keys].apply(tuple, axis=1).isin(set(spent.apply(tuple, axis=1)))
    renamed = results["arm"].map(lambda a: dp_arm(a, target))
    return results.assign(arm=results["arm"].where(~(private & _without_dp(results["arm"])), renamed))


def epsilon_points(results: pd.DataFrame) -> pd.DataFrame:
    """Seed means of Dice and AUC per (protocol, base arm, training set, test centre, target ε)
    for groups with at least one DP arm; columns also ci_low/ci_high (seed means of the bootstrap
    bounds). Target ε is inf for the arm without DP."""
    if results.empty:
        return pd.DataFrame()
    res = _with_eps(results)
    res = res[res["metric"].isin(["dice", "auc"])]
    keys = ["protocol", "base_arm", "train_set", "test_centre"]
    dp = res[np.isfinite(res["target_eps"])][keys].drop_duplicates()
    if dp.empty:
        return pd.DataFrame()
    res = res.merge(dp, on=keys)
    return (res.groupby([*keys, "target_eps", "metric"], sort=False)[["value", "ci_low", "ci_high"]]
            .mean().reset_index())


def epsilon_table(results: pd.DataFrame, protocol_titles: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows: protocol × base arm × training set × test centre × target ε (ascending, ∞ last),
    for every (protocol, base arm, training set) that has at least one DP arm. Cells: Dice
    (lesion images) and AUC as 'value [95% CI]' (mean ± sd over seeds), ε spent (max over seeds)."""
    if results.empty:
        return pd.DataFrame()
    res = _with_eps(results)
    dp_groups = res[np.isfinite(res["target_eps"])][["protocol", "base_arm", "train_set"]].drop_duplicates()
    if dp_groups.empty:
        return pd.DataFrame()
    titles = protocol_titles or {}
    order = {p: i for i, p in enumerate(dict.fromkeys(results["protocol"]))}
    out: list[dict[str, Any]] = []
    for g in sorted(dp_groups.itertuples(index=False), key=lambda g: (order[g.protocol], g.base_arm, g.train_set)):
        sel = res[(res["protocol"] == g.protocol) & (res["base_arm"] == g.base_arm) & (res["train_set"] == g.train_set)]
        for centre in dict.fromkeys(sel["test_centre"]):
            at = sel[sel["test_centre"] == centre]
            for target in sorted(set(at["target_eps"]), key=lambda e: (math.isinf(e), e)):
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
        f"accountant's ε after the last step ({delta_note}; federated: the largest over the sites,",
        "or, tested on a site's own held-back split, the ε that site spent).",
        "The guarantee is per training image, not per patient (docs/privacy.md).",
        "",
        markdown_table(table),
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from common.configtools import ConfigError, load_yaml
    from sim.plots import epsilon_utility

    ap = argparse.ArgumentParser(prog="python -m sim.report_dp", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (their results.csv)")
    ap.add_argument("--reference", nargs="*", type=Path, default=[],
                    help="run folders whose arms without DP give the ε = ∞ points (their DP arms left out)")
    ap.add_argument("--out", type=Path, required=True, help="output prefix: PREFIX.png and PREFIX.csv")
    ap.add_argument("--title", default="Utility of sample-level DP-SGD")
    args = ap.parse_args(argv)
    frames = []
    for run in [*args.runs, *args.reference]:
        path = run / "results.csv"
        if not path.is_file():
            ap.error(f"{path}: no results.csv (not a finished run folder)")
        config: dict[str, Any] = {}
        if (run / "config.yaml").is_file():
            try:
                config = load_yaml(run / "config.yaml")
            except (ConfigError, UnicodeDecodeError) as exc:
                ap.error(f"{run / 'config.yaml'}: not a readable run config ({exc})")
        privacy = config.get("privacy")
        results = label_private_run(pd.read_csv(path), privacy if isinstance(privacy, dict) else {})
        if run in args.reference:
            results = results[_without_dp(results["arm"])]
        frames.append(results)
    points = epsilon_points(pd.concat(frames, ignore_index=True))
    if points.empty:
        ap.error(f"{[str(r) for r in args.runs]}: no DP arm in these runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    points.to_csv(args.out.with_suffix(".csv"), index=False)
    epsilon_utility(points, args.out.with_suffix(".png"), args.title)
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
