"""report.md from a run folder's tidy tables: per-test-centre metric tables with bootstrap CIs,
paired Wilcoxon comparisons on the same images, the published numbers beside ours, and the
train-on-row / test-on-column matrix.

Everything here is a pure function of DataFrames (results.csv, per_image.csv) so the tables can be
checked on hand-made rows. The BI-RADS features on predicted vs ground-truth masks (sim/feature_check.py)
are written beside report.md as ``feature_auc.csv``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from common.atomic import atomic_write
from common.metrics import paired_wilcoxon
from common.settings import PROTOCOL_GROUPS
from sim.feature_check import CSV_NAME, feature_auc_table, feature_section
from sim.protocols import DP_SUFFIX, ENSEMBLE_SUFFIX
from sim.report_dp import dp_section
from sim.report_format import fmt, fmt_p, markdown_table, seed_cell

#: Published external Dice (proposed consistency model, plain multi-task baseline), trained on
#: BrEaST only (Zhang, Moradi, Saha 2025, arXiv 2511.15968).
PUBLISHED_DICE: dict[str, tuple[float, float]] = {
    "UDIAT": (0.81, 0.59),
    "BUSI": (0.66, 0.56),
    "BUS-UCLM": (0.69, 0.49),
}
PUBLISHED_AUC = "≈0.74–0.79"
#: Metrics shown per test centre, with their column titles.
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("dice", "Dice (lesion imgs)"),
    ("iou", "IoU (lesion imgs)"),
    ("hd95", "HD95 px"),
    ("auc", "AUC"),
)
#: Display names of the protocol column values.
PROTOCOL_TITLES: dict[str, str] = {
    "paper": "train on one centre",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "local": "local only",
    "pooled": "pooled (centralised)",
}


@dataclass(frozen=True)
class ReportContext:
    """What the tables alone do not say: where the data came from and how models were chosen."""

    run_name: str
    data_source: str
    centres: pd.DataFrame  # columns: centre, images, lesion_images, malignant, fingerprint
    settings: dict[str, Any] = field(default_factory=dict)
    selection_rule: str = ""
    hd95_unit: str = "px at model input size"
    figures: tuple[tuple[str, str], ...] = ()  # (file name, caption)
    synthetic: bool = False


# -- tables ------------------------------------------------------------------------------------
def centre_table(results: pd.DataFrame, protocols: Sequence[str], test_centre: str) -> pd.DataFrame:
    """Rows: protocol × arm × train set tested on ``test_centre``; cells 'value [95% CI]'."""
    sel = results[results["protocol"].isin(protocols) & (results["test_centre"] == test_centre)]
    out = []
    order = {p: i for i, p in enumerate(protocols)}
    keys = sel[["protocol", "arm", "train_set"]].drop_duplicates()
    keys = keys.assign(_o=keys["protocol"].map(order)).sort_values(["_o", "train_set", "arm"], kind="stable")
    for key in keys.itertuples(index=False):
        rows = sel[(sel["protocol"] == key.protocol) & (sel["arm"] == key.arm) & (sel["train_set"] == key.train_set)]
        row: dict[str, Any] = {
            "protocol": PROTOCOL_TITLES.get(key.protocol, key.protocol),
            "arm": key.arm,
            "trained on": key.train_set,
        }
        for metric, title in TABLE_METRICS:
            row[title] = seed_cell(rows[rows["metric"] == metric], 1 if metric == "hd95" else 3)
        n_les = rows[rows["metric"] == "dice"]["n"]
        n_all = rows[rows["metric"] == "auc"]["n"]
        row["n lesion / all"] = (
            f"{int(n_les.max())} / {int(n_all.max())}" if len(n_les) and len(n_all) else "–"
        )
        out.append(row)
    return pd.DataFrame(out)


def published_column(table: pd.DataFrame, test_centre: str) -> pd.DataFrame:
    """Add the published Dice beside the paper-protocol arms it corresponds to."""
    proposed, baseline = PUBLISHED_DICE.get(test_centre, (math.nan, math.nan))
    mapping = {"consistency": proposed, "multitask": baseline}
    return table.assign(
        **{"published Dice": [fmt(mapping.get(a, math.nan), 2) for a in table["arm"]]}
    )


def arm_dice_table(results: pd.DataFrame, protocol: str, arms: Iterable[str]) -> pd.DataFrame:
    """Dice per arm (rows) and test centre (columns): compact view for ablations and λ sweeps."""
    arms = list(arms)
    sel = results[(results["protocol"] == protocol) & results["arm"].isin(arms) & (results["metric"] == "dice")]
    centres = list(dict.fromkeys(sel["test_centre"]))
    out = []
    for arm in [a for a in arms if a in set(sel["arm"])]:
        row = {"arm": arm}
        for c in centres:
            row[c] = seed_cell(sel[(sel["arm"] == arm) & (sel["test_centre"] == c)])
        out.append(row)
    return pd.DataFrame(out)


def matrix_table(
    results: pd.DataFrame, protocol: str = "local", metric: str = "dice", arm: str | None = None
) -> pd.DataFrame:
    """Train-on-row / test-on-column means over seeds (numbers, for the heat map and report)."""
    sel = results[(results["protocol"] == protocol) & (results["metric"] == metric)]
    if arm is not None:
        sel = sel[sel["arm"] == arm]
    if sel.empty:
        return pd.DataFrame()
    mat = sel.pivot_table(index="train_set", columns="test_centre", values="value", aggfunc="mean")
    order = list(dict.fromkeys(sel["test_centre"]))  # run order (centres as listed), not alphabetical
    rows = [c for c in order if c in mat.index] + [r for r in mat.index if r not in order]
    return mat.reindex(index=rows, columns=[c for c in order if c in mat.columns])


def paired_comparison(
    per_image: pd.DataFrame,
    a: tuple[str, str],
    b: tuple[str, str],
    metric: str = "dice",
) -> pd.DataFrame:
    """Paired Wilcoxon of per-image ``metric`` between (protocol, arm) ``a`` and ``b`` on the same
    images (same train set, test centre, case); per-image values are first averaged over seeds.
    Images where either value is undefined (e.g. Dice without a lesion) are left out."""
    cols = ["train set", "test centre", "pairs", f"mean {metric} A", f"mean {metric} B", "Δ (A−B)", "Wilcoxon p"]
    if per_image.empty or metric not in per_image.columns:
        return pd.DataFrame(columns=cols)

    def side(proto: str, arm: str) -> pd.DataFrame:
        sel = per_image[(per_image["protocol"] == proto) & (per_image["arm"] == arm)]
        return sel.groupby(["train_set", "test_centre", "case_id"])[metric].mean()

    joined = pd.concat({"a": side(*a), "b": side(*b)}, axis=1).dropna()
    out = []
    for (train_set, centre), grp in joined.groupby(level=[0, 1], sort=False):
        va, vb = grp["a"].to_numpy(float), grp["b"].to_numpy(float)
        p = paired_wilcoxon(va, vb) if len(va) else math.nan
        out.append([train_set, centre, len(va), fmt(va.mean()), fmt(vb.mean()), fmt(va.mean() - vb.mean()), fmt_p(p)])
    return pd.DataFrame(out, columns=cols)


# -- the document ------------------------------------------------------------------------------
def _section_per_centre(results: pd.DataFrame, protocols: Sequence[str], published: bool) -> list[str]:
    lines: list[str] = []
    centres = list(dict.fromkeys(results[results["protocol"].isin(protocols)]["test_centre"]))
    for centre in centres:
        table = centre_table(results, protocols, centre)
        if table.empty:
            continue
        if published:
            table = published_column(table, centre)
        lines += [f"#### Tested on {centre}", "", markdown_table(table)]
    return lines


def _comparisons(per_image: pd.DataFrame, pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]) -> list[str]:
    lines: list[str] = []
    for a, b in pairs:
        table = paired_comparison(per_image, a, b)
        if table.empty:
            continue
        lines += [
            f"A = {PROTOCOL_TITLES.get(a[0], a[0])} / {a[1]}, B = {PROTOCOL_TITLES.get(b[0], b[0])} / {b[1]}"
            " (paired per image, lesion images):",
            "",
            markdown_table(table),
        ]
    return lines


def build_report(results: pd.DataFrame, per_image: pd.DataFrame, ctx: ReportContext) -> str:
    """The whole report.md text."""
    present = set(results["protocol"]) if not results.empty else set()

    def arms(protocol: str) -> set[str]:
        return set(results[results["protocol"] == protocol]["arm"])

    lines = [f"# Leave-centre-out validation — {ctx.run_name}", ""]
    lines += [f"Data: {ctx.data_source}", ""]
    if ctx.synthetic:
        lines += [
            "> **Synthetic data.** These centres are generated (common.data.synthetic); the numbers test",
            "> the pipeline, not the method. The published numbers refer to the real centres.",
            "",
        ]
    if not ctx.centres.empty:
        lines += ["Centres:", "", markdown_table(ctx.centres)]
    if ctx.settings:
        lines += ["Settings:", ""] + [f"- {k}: {v}" for k, v in ctx.settings.items()] + [""]
    lines += [
        "How to read the tables:",
        "",
        "- **Dice, IoU and HD95 are over lesion images only** (the Dice of an empty ground truth is",
        "  degenerate); AUC is malignant vs benign + normal over all images of the test centre",
        "  (not reported for seg_only, whose classification head is never trained).",
        f"- HD95 in {ctx.hd95_unit}.",
        "- Cells: value [95% percentile-bootstrap CI over images]; with several seeds, mean ± sd over seeds.",
        "- Wilcoxon: two-sided paired signed-rank test on per-image Dice, same images, seeds averaged per image.",
    ]
    if ctx.selection_rule:
        lines += [f"- Model selection: {ctx.selection_rule}"]
    lines += [""]

    if "paper" in present:
        lines += [
            "## Protocol 1 — the published external validation",
            "",
            "Trained on one centre, tested on every other centre without fine-tuning. Published",
            "(trained on BrEaST): Dice proposed vs plain multi-task UDIAT 0.81 vs 0.59, BUSI 0.66 vs 0.56,",
            f"BUS-UCLM 0.69 vs 0.49 (all p < 0.001); external AUC {PUBLISHED_AUC}.",
            "",
        ]
        main_arms = [a for base in ("seg_only", "multitask", "consistency")
                     for a in (base, base + ENSEMBLE_SUFFIX) if a in arms("paper")]
        sub = results[(results["protocol"] == "paper") & results["arm"].isin(main_arms)]
        lines += _section_per_centre(sub, ["paper"], published=True)
        lines += ["### Consistency vs plain multi-task", ""]
        comp = _comparisons(per_image, [(("paper", "consistency"), ("paper", "multitask"))])
        lines += comp or ["_(needs both the consistency and multitask arms)_", ""]
        extra = sorted(a for a in arms("paper") - set(main_arms) if DP_SUFFIX not in a)  # DP: own table
        if extra:
            lines += ["### Feature ablations and λ sweep (Dice, lesion images)", ""]
            lines += [markdown_table(arm_dice_table(results, "paper", ["consistency", *extra]))]

    strategies = [p for p in PROTOCOL_GROUPS["federated"] if p in present]
    fed = [*strategies, *(["pooled"] if "pooled" in present else [])]
    if strategies:
        fed_rows = results[results["protocol"].isin(strategies)]
        own = any(t in str(tr).split("+") for t, tr in zip(fed_rows["test_centre"], fed_rows["train_set"]))
        lines += [  # sim.test_on: held_out, or own_split (every centre trains, tested on its own split)
            "## Protocol 2 — federated, each centre tested on its own held-back split",
            "",
            "Every centre trains (each a Flower client on the simulation engine) without its own test",
            "split, patient-aware; the final global model is tested on each centre's split. Pooled",
            "centralised training on the same images is the upper bound.",
            "",
        ] if own else [
            "## Protocol 2 — federated leave-one-centre-out",
            "",
            "For each held-out centre, the other centres train together (each a Flower client on the",
            "simulation engine); the final global model is tested on the held-out centre. Pooled",
            "centralised training on the same centres is the upper bound.",
            "",
        ]
        lines += _section_per_centre(results, fed, published=False)
        pairs = ([((st, "consistency"), (st, "multitask")) for st in strategies]
                 + [((st, "consistency"), ("fedavg", "consistency")) for st in strategies if st != "fedavg"]
                 + [((st, "consistency"), ("pooled", "consistency")) for st in strategies])
        comp = _comparisons(per_image, pairs)
        if comp:
            lines += ["### Paired comparisons", ""] + comp

    if {"local", "pooled"} & present:
        lines += [
            "## Protocol 3 — reference rows",
            "",
            "Local only: each centre trained alone (row), tested on every centre (column); the diagonal",
            "is the centre's own held-out test split. Pooled: centralised training on the centres named.",
            "",
        ]
        for arm in sorted(arms("local")):
            for metric, title in (("dice", "Dice (lesion images)"), ("auc", "AUC")):
                mat = matrix_table(results, "local", metric, arm)
                shown = mat.map(fmt).reset_index().rename(columns={"train_set": "trained on ↓ / tested on →"})
                lines += [f"Local-only {title}, arm {arm} (mean over seeds):", "", markdown_table(shown)]
        shown = ["local"] + ([] if strategies else ["pooled"])  # else in protocol 2
        lines += _section_per_centre(results, shown, published=False)

    lines += dp_section(results, "at the δ of the settings above", PROTOCOL_TITLES)
    lines += feature_section(feature_auc_table(per_image), PROTOCOL_TITLES)
    if ctx.figures:
        lines += ["## Figures", ""]
        for name, caption in ctx.figures:
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, results: pd.DataFrame, per_image: pd.DataFrame, ctx: ReportContext) -> Path:
    """report.md at ``path`` and, when per_image has the feature columns, ``feature_auc.csv`` beside it."""
    table = feature_auc_table(per_image)
    if not table.empty:
        atomic_write(Path(path).parent / CSV_NAME, lambda fh: table.to_csv(fh, index=False), mode=None)
    text = build_report(results, per_image, ctx)
    atomic_write(path, lambda fh: fh.write(text), mode=None)
    return Path(path)
