"""PNG figures of a leave-centre-out run: Dice box plots, training curves, example overlays, the
train-on-row / test-on-column heat map and Dice / AUC against the privacy budget ε. Each function
takes tidy tables (or the arrays saved per unit) and a path, draws with the non-interactive Agg
backend and returns the path, or None when there is nothing to draw."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 110


def _series_label(protocol: str, arm: str, several_protocols: bool) -> str:
    return f"{protocol}/{arm}" if several_protocols else arm


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def dice_boxplot(per_image: pd.DataFrame, protocols: Sequence[str], path: Path, title: str) -> Path | None:
    """Per-test-centre box plots of per-image Dice (lesion images; seeds averaged per image),
    one box per protocol/arm series, grouped by test centre."""
    sel = per_image[per_image["protocol"].isin(protocols)] if not per_image.empty else per_image
    if sel.empty or "dice" not in sel.columns:
        return None
    sel = sel[np.isfinite(sel["dice"].astype(float))]
    if sel.empty:
        return None
    values = (sel.groupby(["protocol", "arm", "test_centre", "train_set", "case_id"], sort=False)["dice"]
              .mean().reset_index())
    centres = list(dict.fromkeys(values["test_centre"]))
    series = list(dict.fromkeys(zip(values["protocol"], values["arm"])))
    several = len({p for p, _ in series}) > 1
    width = 0.8 / max(len(series), 1)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(centres) * max(1, len(series)) ** 0.5 + 2), 4.2))
    for j, (proto, arm) in enumerate(series):
        data, pos = [], []
        for i, centre in enumerate(centres):
            v = values[(values["protocol"] == proto) & (values["arm"] == arm) & (values["test_centre"] == centre)]
            if len(v):
                data.append(v["dice"].to_numpy(float))
                pos.append(i - 0.4 + width * (j + 0.5))
        if not data:
            continue
        bp = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=False,
                        medianprops={"color": "black"})
        for box in bp["boxes"]:
            box.set_facecolor(colours(j % 10))
            box.set_alpha(0.75)
        ax.plot([], [], "s", color=colours(j % 10), label=_series_label(proto, arm, several))
        for p, d in zip(pos, data):
            ax.plot(p, d.mean(), marker="D", color="white", markeredgecolor="black", markersize=4, zorder=3)
    ax.set_xticks(range(len(centres)))
    ax.set_xticklabels(centres)
    ax.set_xlim(-0.6, len(centres) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per lesion image")
    ax.set_xlabel("test centre")
    ax.set_title(f"{title}  (◇ = mean)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def training_curves(curves: pd.DataFrame, protocols: Sequence[str], path: Path, title: str) -> Path | None:
    """Loss and validation Dice per epoch (centralised) or round (federated), one line per unit
    (seed 0 only, so the legend stays readable)."""
    if curves.empty:
        return None
    sel = curves[curves["protocol"].isin(protocols)]
    if sel.empty:
        return None
    seeds = sorted(sel["seed"].unique())
    sel = sel[sel["seed"] == seeds[0]]
    several = sel["protocol"].nunique() > 1
    units = list(dict.fromkeys(zip(sel["protocol"], sel["arm"], sel["train_set"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    cmap = plt.get_cmap("tab20" if len(units) > 10 else "tab10")
    for k, (proto, arm, train_set) in enumerate(units):
        u = sel[(sel["protocol"] == proto) & (sel["arm"] == arm) & (sel["train_set"] == train_set)].sort_values("step")
        label = f"{_series_label(proto, arm, several)} · {train_set}"
        for ax, col in zip(axes, ("loss", "val_dice")):
            if col in u.columns and u[col].notna().any():
                ax.plot(u["step"], u[col], marker="o", markersize=3, color=cmap(k % cmap.N), label=label)
    step_name = " / ".join(sorted(sel["step_kind"].unique())) if "step_kind" in sel.columns else "step"
    axes[0].set_title("training loss")
    single = sel.groupby(["protocol", "arm", "train_set"])["val_dice"].count().max() <= 1
    axes[1].set_title("validation Dice (lesion images)" + (" of the final model" if single else ""))
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel(step_name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{title} (seed {seeds[0]})")
    fig.tight_layout()
    return _save(fig, path)


def _outline(ax: plt.Axes, mask: np.ndarray, colour: str) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)


def example_overlays(examples: Mapping[str, np.ndarray], path: Path, title: str, max_rows: int = 8) -> Path | None:
    """Grid: per example the image, the truth (green), the prediction (red, with the soft mask),
    and the predicted malignancy p̂, the label and the BI-RADS feature values.

    ``examples``: images (N,S,S) in [0,1], masks (N,S,S), probs (N,S,S), p_hat (N,), malignant (N,),
    centres (N,), case_ids (N,), feature_names (K,), features (N,K), dice (N,); optional phi (N,)
    and prior_names (the features φ uses, marked with •)."""
    n = min(len(examples["images"]), max_rows)
    if n == 0:
        return None
    names = [str(x) for x in examples.get("feature_names", [])]
    fig, axes = plt.subplots(n, 4, figsize=(10.5, 2.45 * n), gridspec_kw={"width_ratios": [1, 1, 1, 1.15]},
                             squeeze=False)
    for i in range(n):
        img = examples["images"][i]
        truth = examples["masks"][i] > 0.5
        prob = examples["probs"][i]
        ax_img, ax_true, ax_pred, ax_txt = axes[i]
        for ax in (ax_img, ax_true, ax_pred):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_true.imshow(np.ma.masked_where(~truth, truth), cmap="Greens", alpha=0.35, vmin=0, vmax=1)
        _outline(ax_true, truth, "lime")
        ax_pred.imshow(np.ma.masked_where(prob < 0.1, prob), cmap="Reds", alpha=0.5, vmin=0, vmax=1)
        _outline(ax_pred, prob > 0.5, "red")
        _outline(ax_pred, truth, "lime")
        label = "malignant" if float(examples["malignant"][i]) > 0.5 else "benign/normal"
        ax_img.set_ylabel(f"{examples['centres'][i]}\n{examples['case_ids'][i]}"[:40], fontsize=8)
        if i == 0:
            ax_img.set_title("image", fontsize=9)
            ax_true.set_title("truth (green)", fontsize=9)
            ax_pred.set_title("prediction (red)", fontsize=9)
        dice = float(examples["dice"][i]) if "dice" in examples else float("nan")
        lines = [f"p̂ malignant = {float(examples['p_hat'][i]):.2f}"]
        if "phi" in examples:
            lines.append(f"φ (BI-RADS prior) = {float(examples['phi'][i]):.2f}")
        lines += [f"label: {label}",
                 f"Dice = {dice:.2f}" if np.isfinite(dice) else "Dice: no lesion", ""]
        feats = examples.get("features")
        in_prior = {str(x) for x in examples.get("prior_names", [])}
        if feats is not None and len(names):
            lines += ["BI-RADS features (• in φ):"]
            lines += [f"{'•' if nm in in_prior else ' '} {nm:<16s}{float(v):7.3f}" for nm, v in zip(names, feats[i])]
        ax_txt.axis("off")
        ax_txt.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace",
                    transform=ax_txt.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return _save(fig, path)


def heatmap(matrix: pd.DataFrame, path: Path, title: str, label: str = "mean Dice (lesion images)") -> Path | None:
    """Train-on-row / test-on-column matrix with the value written in each cell."""
    if matrix.empty:
        return None
    values = matrix.to_numpy(float)
    fig, ax = plt.subplots(figsize=(1.3 * values.shape[1] + 2.5, 1.0 * values.shape[0] + 1.6))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="black" if v > 0.6 else "white")
    for r, row_name in enumerate(matrix.index):
        if row_name in list(matrix.columns):  # own centre: internal test split
            c = list(matrix.columns).index(row_name)
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2))
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels(list(matrix.columns), rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels(list(matrix.index))
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def _line_label(lines: list[tuple[str, str, str, str]], proto: str, arm: str, train: str, centre: str) -> str:
    """'train → centre', with the protocol and arm where the plot holds several."""
    extra = [v for k, v in ((0, proto), (1, arm)) if len({line[k] for line in lines}) > 1]
    return f"{train} → {centre}" + (f" ({', '.join(extra)})" if extra else "")


def epsilon_utility(points: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Dice and AUC (seed means, bootstrap CI bars) against target ε, one line per training set →
    test centre; the arm without DP (ε = ∞) is drawn at the right, past the largest ε.
    ``points``: sim.report_dp.epsilon_points."""
    if points.empty:
        return None
    finite = sorted(e for e in set(points["target_eps"]) if np.isfinite(e))
    inf_x = (finite[-1] * 2.5) if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.get_cmap("tab10")
    lines = list(dict.fromkeys(zip(points["protocol"], points["base_arm"], points["train_set"], points["test_centre"])))
    for metric, ax in zip(("dice", "auc"), axes):
        for j, (proto, arm, train, centre) in enumerate(lines):
            sel = points[(points["protocol"] == proto) & (points["base_arm"] == arm) & (points["train_set"] == train)
                         & (points["test_centre"] == centre) & (points["metric"] == metric)]
            sel = sel.assign(x=sel["target_eps"].map(lambda e: inf_x if np.isinf(e) else e)).sort_values("x")
            if sel.empty:
                continue
            y = sel["value"].to_numpy(float)
            err = np.abs(np.vstack([y - sel["ci_low"].to_numpy(float), sel["ci_high"].to_numpy(float) - y]))
            ax.errorbar(sel["x"], y, yerr=np.nan_to_num(err), marker="o", capsize=3, color=colours(j % 10),
                        label=_line_label(lines, proto, arm, train, centre))
        ax.set_xscale("log")
        ticks = [*finite, inf_x]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{e:g}" for e in finite] + ["∞ (no DP)"])
        ax.minorticks_off()
        ax.set_xlabel("target ε (δ fixed)")
        ax.set_ylabel("Dice (lesion images)" if metric == "dice" else "AUC")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
