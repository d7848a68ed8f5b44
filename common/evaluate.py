"""Scoring: a network's batched predictions, per-image metrics and a fixed summary
(``common.inference`` predicts with the configured views and post-processing and scores here).

All metrics are computed at the model resolution (S×S, masks resized nearest-neighbour by
``to_tensors``); HD95 in mm uses the pixel spacing rescaled to that resolution and is NaN where
the spacing is unknown. Dice, IoU and HD95 are per lesion image (NaN for normal images) and the
summary averages them over lesion images only. An empty prediction on a lesion image gets Dice 0
and HD95 equal to the image diagonal (see ``common.metrics.hd95``). Malignancy is scored over
all images: malignant (1) vs benign or normal (0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from common import metrics
from common.data.tensors import TensorData, normalise
from common.device import resolve_device

SUMMARY_KEYS: tuple[str, ...] = (
    "dice", "iou", "hd95", "auc", "sensitivity", "specificity", "accuracy", "n_images", "n_lesion",
)
PER_IMAGE_COLUMNS: tuple[str, ...] = (
    "case_id", "centre", "label", "malignant", "has_lesion", "p_malignant",
    "dice", "iou", "hd95_px", "hd95_mm", "pred_area",
)


@dataclass
class EvalResult:
    """per_image: one row per image (PER_IMAGE_COLUMNS); summary: SUMMARY_KEYS → float."""

    per_image: pd.DataFrame
    summary: dict[str, float]


def predict(
    model: nn.Module,
    data: TensorData,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mask probabilities (N,1,S,S) float32, malignancy probabilities (N,) float32), in data
    order. Runs in eval mode under inference_mode and restores the model's previous mode."""
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    was_training = model.training
    model.eval()
    probs, mal = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                raw = data.images[start : start + batch_size].to(dev, non_blocking=True)
                mask_logits, cls_logit = model(normalise(raw))
                probs.append(torch.sigmoid(mask_logits).float().cpu())
                mal.append(torch.sigmoid(cls_logit.reshape(-1)).float().cpu())
    finally:
        model.train(was_training)
    if not probs:
        side = data.images.shape[-1]
        return np.zeros((0, 1, side, side), np.float32), np.zeros((0,), np.float32)
    return torch.cat(probs).numpy(), torch.cat(mal).numpy()


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def score(
    probs: np.ndarray,
    p_malignant: np.ndarray,
    data: TensorData,
    *,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> EvalResult:
    """Per-image metrics and the summary of predictions ``probs`` (N,1,S,S), ``p_malignant`` (N,).
    ``threshold`` decides malignant for sensitivity, specificity and accuracy; ``mask_threshold``
    binarises the mask probabilities. Summary: dice, iou, hd95 (px) are means over lesion images
    with a known mask; auc, sensitivity, specificity, accuracy over images with a known label
    (partial annotations: an unknown mask or label is not scored as empty or benign); NaN where
    undefined. ``n_lesion`` counts the lesion images whose Dice is defined."""
    true = data.masks.cpu().numpy()[:, 0] > 0.5
    masked = data.has_mask.cpu().numpy().astype(bool)
    labelled = data.has_label.cpu().numpy().astype(bool)
    pred = np.asarray(probs)[:, 0] >= mask_threshold
    spacing = data.spacing_mm.cpu().numpy().astype(float)
    rows = []
    for i in range(len(data)):
        d, j = metrics.dice(pred[i], true[i]), metrics.iou(pred[i], true[i])
        h = metrics.hd95(pred[i], true[i])
        rows.append((d, j, h, h * spacing[i] if np.isfinite(spacing[i]) else float("nan"),
                     int(pred[i].sum())))
    seg = np.array(rows, dtype=float).reshape(-1, 5)
    seg[~masked, :4] = np.nan  # no mask: no segmentation score
    y = data.malignant.cpu().numpy().astype(float)
    p = np.asarray(p_malignant, dtype=float)
    per_image = pd.DataFrame({
        "case_id": list(data.case_ids),
        "centre": list(data.centres),
        "label": data.labels.cpu().numpy().astype(int),
        "malignant": y.astype(int),
        "has_lesion": data.has_lesion.cpu().numpy().astype(bool),
        "p_malignant": p,
        "dice": seg[:, 0], "iou": seg[:, 1], "hd95_px": seg[:, 2], "hd95_mm": seg[:, 3],
        "pred_area": seg[:, 4].astype(int),
    }, columns=list(PER_IMAGE_COLUMNS))
    yl, pl = y[labelled], p[labelled]
    decided = pl >= threshold
    sens, spec = metrics.sens_spec(yl, decided)
    summary = {
        "dice": _nanmean(seg[:, 0]),
        "iou": _nanmean(seg[:, 1]),
        "hd95": _nanmean(seg[:, 2]),
        "auc": metrics.binary_auc(yl, pl),
        "sensitivity": sens,
        "specificity": spec,
        "accuracy": float(np.mean(decided == (yl > 0.5))) if len(yl) else float("nan"),
        "n_images": float(len(data)),
        "n_lesion": float((per_image["has_lesion"].to_numpy(bool) & masked).sum()),
    }
    return EvalResult(per_image=per_image, summary=summary)

