"""Does the model's mask keep the shape signal radiologists use? Per test centre, the AUC for
malignancy (malignant vs benign, lesion images) of each BI-RADS prior feature computed on the
model's predicted mask and on the ground-truth mask, and of the prior φ on both.

At scoring time (``with_prior_features``, called from sim/units.py) each lesion image with a
known mask and label gets columns in per_image.csv: ``feat_pred_<f>`` / ``feat_true_<f>`` (the
features of the post-processed mask probabilities and of the true mask), ``phi_pred`` /
``phi_true`` (the model's learned prior) and ``phi0_pred`` / ``phi0_true`` (equal weights in the
clinical directions over the same standardisation: the untrained prior, the learned prior's
baseline). Other images get NaN. ``feature_auc_table`` turns them into ``feature_auc.csv``
and ``feature_section`` into the report's section. Every feature is oriented in its BI-RADS
direction (``CLINICAL_SIGN``), so an AUC above 0.5 separates the classes as radiologists expect.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from common.birads import birads_features
from common.metrics import binary_auc
from common.prior import CLINICAL_SIGN
from common.records import Label
from sim.report_format import fmt, markdown_table

if TYPE_CHECKING:
    from common.data.tensors import TensorData

PRED, TRUE = "feat_pred_", "feat_true_"
#: Scores besides the single features: (per_image column stem, row name in the table)
PRIORS: tuple[tuple[str, str], ...] = (("phi", "phi (learned)"), ("phi0", "phi (equal weights)"))
KEYS: tuple[str, ...] = ("protocol", "arm", "train_set", "test_centre", "seed")
TABLE_COLUMNS: tuple[str, ...] = (*KEYS, "feature", "n_lesions", "n_malignant", "auc_true_mask",
                                  "auc_pred_mask")
CSV_NAME = "feature_auc.csv"


@torch.no_grad()
def prior_feature_columns(prior: torch.nn.Module, data: TensorData, probs: np.ndarray,
                          chunk: int = 32) -> pd.DataFrame:
    """One row per image of ``data`` (in order) with the columns of the module docstring.
    ``prior``: the model's ``BiradsPrior`` (left as it was: a CPU eval copy is used);
    ``probs``: (N,1,S,S) predicted mask probabilities."""
    prior = copy.deepcopy(prior).cpu().eval()
    names = list(prior.names)
    n = len(data)
    out = {f"{p}{f}": np.full(n, np.nan) for p in (PRED, TRUE) for f in names}
    out.update({f"{stem}_{side}": np.full(n, np.nan) for stem, _ in PRIORS for side in ("pred", "true")})
    masks = data.masks.detach().cpu().float()
    lesion = (data.has_mask.cpu() & data.has_label.cpu() & (data.labels.cpu() != int(Label.NORMAL))
              & (masks.flatten(1).amax(1) > 0)).numpy()
    idx = np.flatnonzero(lesion)
    signs = torch.tensor([float(CLINICAL_SIGN[f]) for f in names])
    for start in range(0, idx.size, chunk):
        at = torch.from_numpy(idx[start:start + chunk])
        image = data.images[at].detach().cpu().float()
        for side, mask in (("pred", torch.from_numpy(np.asarray(probs)[at.numpy()]).float()), ("true", masks[at])):
            feats = birads_features(mask, image, None, names).double()
            for k, f in enumerate(names):
                out[f"{PRED if side == 'pred' else TRUE}{f}"][at.numpy()] = feats[:, k].numpy()
            z = prior.standardise(feats.to(prior.running_mean.dtype))
            out[f"phi_{side}"][at.numpy()] = prior(feats.to(prior.running_mean.dtype)).double().numpy()
            out[f"phi0_{side}"][at.numpy()] = torch.sigmoid(0.5 * z @ signs.to(z.dtype)).double().numpy()
    return pd.DataFrame(out)


def with_prior_features(scored: Any, model: torch.nn.Module) -> pd.DataFrame:
    """``scored.result.per_image`` (a ``sim.units.Scored``) with the feature columns added."""
    cols = prior_feature_columns(model.prior, scored.data, scored.probs)  # type: ignore[arg-type]
    return scored.result.per_image.assign(**{c: cols[c].to_numpy() for c in cols.columns})


def feature_auc_table(per_image: pd.DataFrame) -> pd.DataFrame:
    """``TABLE_COLUMNS`` rows: per unit, test centre and feature (the prior features, then
    φ learned and φ with equal weights), the AUC on the true and on the predicted masks. Groups
    without both benign and malignant lesion images are left out (their AUC is undefined)."""
    feats = [c[len(TRUE):] for c in per_image.columns if c.startswith(TRUE)]
    if not feats or any(k not in per_image.columns for k in KEYS):
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    rows = per_image[per_image[[f"{TRUE}{f}" for f in feats]].notna().all(axis=1)]
    out = []
    for key, grp in rows.groupby(list(KEYS), sort=False):
        y = grp["malignant"].to_numpy(float)
        n_mal = int(y.sum())
        if n_mal == 0 or n_mal == len(y):
            continue
        scores = [(f, CLINICAL_SIGN.get(f, 1) * grp[f"{TRUE}{f}"], CLINICAL_SIGN.get(f, 1) * grp[f"{PRED}{f}"])
                  for f in feats]
        scores += [(title, grp[f"{stem}_true"], grp[f"{stem}_pred"]) for stem, title in PRIORS
                   if f"{stem}_true" in grp.columns]
        for name, true, pred in scores:
            out.append([*key, name, len(y), n_mal, binary_auc(y, true.to_numpy(float)),
                        binary_auc(y, pred.to_numpy(float))])
    return pd.DataFrame(out, columns=list(TABLE_COLUMNS))


def feature_section(table: pd.DataFrame, titles: dict[str, str] | None = None) -> list[str]:
    """The report's section: per test centre, one row per (protocol, arm, train set), one cell
    per feature 'pred / GT' (means over seeds). [] without rows."""
    if table.empty:
        return []
    titles = titles or {}
    lines = ["## BI-RADS features on predicted vs ground-truth masks", "",
             "AUC for malignancy (malignant vs benign, lesion images with a ground-truth mask) of each "
             "prior feature, oriented in its BI-RADS direction (> 0.5: separates as radiologists "
             "expect). Cells: AUC on the model's predicted mask / on the ground-truth mask, means over "
             "seeds. φ: the model's learned prior; φ equal weights: the untrained prior (equal weights "
             "in the clinical directions, same standardisation). Written to "
             f"`{CSV_NAME}`.", ""]
    names = list(dict.fromkeys(table["feature"]))
    mean = table.groupby(["test_centre", "protocol", "arm", "train_set", "feature"], sort=False)[
        ["auc_pred_mask", "auc_true_mask", "n_lesions", "n_malignant"]].mean()
    for centre in dict.fromkeys(table["test_centre"]):
        sub = mean.loc[centre]
        out = []
        for (protocol, arm, train_set), grp in sub.groupby(level=[0, 1, 2], sort=False):
            cells = grp.droplevel([0, 1, 2])
            first = cells.iloc[0]
            row = {"protocol": titles.get(protocol, protocol), "arm": arm, "trained on": train_set,
                   "lesions (malignant)": f"{int(first['n_lesions'])} ({int(first['n_malignant'])})"}
            for f in names:
                row[f.replace("phi", "φ")] = (f"{fmt(cells.loc[f, 'auc_pred_mask'], 2)} / "
                                              f"{fmt(cells.loc[f, 'auc_true_mask'], 2)}" if f in cells.index else "–")
            out.append(row)
        lines += [f"#### Tested on {centre}", "", markdown_table(pd.DataFrame(out))]
    return lines
