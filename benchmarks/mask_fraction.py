"""The partial-mask matrix (issue #31, ``sim/experiments/partial_masks.yaml``): simulation run
folders (one or more per mask fraction, each arm in one of them) → a table and a plot of external
Dice and AUC against the fraction of BrEaST lesion images that kept their mask, one line per arm.

Per (fraction, arm, test centre): Dice over lesion images and AUC over all images, each image's
score first averaged over the arm's seeds; a 95 % bootstrap CI over images; the per-seed spread;
and, against the plain multi-task arm of the same fraction, the paired difference with its
Wilcoxon p (Dice, per image) or its paired-bootstrap p (AUC):

    python -m benchmarks.mask_fraction runs/pm-0.1/lco-* runs/pm-0.1b/lco-* runs/pm-0.25/lco-* --out docs/img/mask_fraction
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common import metrics

PLAIN = "multitask"
KEY = ["test_centre", "case_id"]


def fraction_of(run: Path) -> float:
    """``data.mask_fraction`` of a run folder's resolved config."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    exp = cfg.get("experiment", cfg)
    return float(exp["data"]["mask_fraction"])


def per_image(run: Path) -> pd.DataFrame:
    """Seed-averaged Dice (lesion images) and p̂ (all images) per (arm, centre, case)."""
    df = pd.read_csv(run / "per_image.csv")
    df = df[df["protocol"] == "paper"]
    return (df.groupby(["arm", *KEY], as_index=False)
              .agg(dice=("dice", "mean"), p=("p_malignant", "mean"), malignant=("malignant", "first"),
                   lesion=("has_lesion", "first")))


def auc_boot(y: np.ndarray, p: np.ndarray, q: np.ndarray | None = None, n: int = 1000,
             seed: int = 0) -> tuple[float, float, float]:
    """(CI low, CI high, two-sided p of AUC(p) − AUC(q) ≠ 0) by resampling images; p NaN
    without ``q``."""
    rng = np.random.default_rng(seed)
    diffs, vals = [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max():
            continue
        a = metrics.binary_auc(y[i], p[i])
        vals.append(a)
        if q is not None:
            diffs.append(a - metrics.binary_auc(y[i], q[i]))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    pval = float("nan")
    if diffs:
        d = np.asarray(diffs)
        pval = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return float(lo), float(hi), pval


def by_fraction(runs: list[Path]) -> dict[float, tuple[pd.DataFrame, pd.DataFrame]]:
    """{mask fraction: (per-image rows, results rows)} with the run folders of one fraction
    merged (arms run later in a folder of their own); an arm in two folders of one fraction, or a
    fraction without the plain arm, is refused naming the folders."""
    merged: dict[float, tuple[pd.DataFrame, pd.DataFrame]] = {}
    where: dict[tuple[float, str], Path] = {}
    for run in runs:
        frac, img = fraction_of(run), per_image(run)
        res = pd.read_csv(run / "results.csv")
        res = res[(res["protocol"] == "paper") & res["metric"].isin(["dice", "auc"])]
        for arm in sorted(img["arm"].unique()):
            if (frac, arm) in where:
                raise SystemExit(f"{run}: arm {arm} at mask fraction {frac:g} is also in {where[frac, arm]}; "
                                 "pass one folder per arm")
            where[frac, arm] = run
        if frac in merged:
            img, res = (pd.concat([a, b], ignore_index=True) for a, b in zip(merged[frac], (img, res)))
        merged[frac] = (img, res)
    for frac, (img, _res) in merged.items():
        if PLAIN not in set(img["arm"]):
            folders = sorted(str(r) for (f, _a), r in where.items() if f == frac)
            raise SystemExit(f"mask fraction {frac:g}: no {PLAIN} arm to compare with in {folders}")
    return merged


def summarise(runs: list[Path]) -> pd.DataFrame:
    rows = []
    for frac, (img, res) in by_fraction(runs).items():
        for (arm, centre), g in img.groupby(["arm", "test_centre"]):
            plain = img[(img["arm"] == PLAIN) & (img["test_centre"] == centre)].set_index("case_id")
            g = g.set_index("case_id")
            les = g[g["lesion"].astype(bool)]
            d_lo, d_hi = metrics.bootstrap_ci(les["dice"].to_numpy(), n=1000)
            y, p = g["malignant"].to_numpy(int), g["p"].to_numpy(float)
            q = plain.loc[g.index, "p"].to_numpy(float) if arm != PLAIN else None
            a_lo, a_hi, a_p = auc_boot(y, p, q)
            seeds = res[(res["arm"] == arm) & (res["test_centre"] == centre)]
            sd = seeds.groupby("metric")["value"].std()
            row = {"fraction": frac, "arm": arm, "centre": centre, "seeds": seeds["seed"].nunique(),
                   "dice": les["dice"].mean(), "dice_lo": d_lo, "dice_hi": d_hi, "dice_seed_sd": sd.get("dice"),
                   "auc": metrics.binary_auc(y, p), "auc_lo": a_lo, "auc_hi": a_hi, "auc_seed_sd": sd.get("auc"),
                   "auc_p_vs_plain": a_p}
            if arm != PLAIN:
                pl = plain.loc[les.index, "dice"].to_numpy(float)
                row["dice_minus_plain"] = les["dice"].mean() - float(np.nanmean(pl))
                row["dice_p_vs_plain"] = metrics.paired_wilcoxon(les["dice"].to_numpy(float), pl)
                row["auc_minus_plain"] = row["auc"] - metrics.binary_auc(y, q)
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["centre", "arm", "fraction"]).reset_index(drop=True)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = sorted(table["centre"].unique())
    fig, axes = plt.subplots(2, len(centres), figsize=(5 * len(centres), 7), squeeze=False)
    for j, centre in enumerate(centres):
        for i, metric in enumerate(("dice", "auc")):
            ax = axes[i][j]
            for arm, g in table[table["centre"] == centre].groupby("arm"):
                g = g.sort_values("fraction")
                ax.errorbar(g["fraction"] * 100, g[metric], marker="o", capsize=3, label=arm,
                            yerr=[g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]])
            ax.set_xscale("log")
            ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
            ax.set_xlabel("BrEaST lesion images with a mask (%)")
            ax.set_ylabel(f"external {metric.upper() if metric == 'auc' else 'Dice'}")
            ax.set_title(f"{centre}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="simulation run folders (each arm of a mask fraction in one)")
    ap.add_argument("--out", type=Path, required=True, help="path prefix of the .csv and .png written")
    args = ap.parse_args(argv)
    table = summarise(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.4f")
    plot(table, args.out.with_suffix(".png"))
    cols = ["fraction", "arm", "centre", "seeds", "dice", "dice_lo", "dice_hi", "dice_minus_plain",
            "dice_p_vs_plain", "auc", "auc_minus_plain", "auc_p_vs_plain"]
    print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
