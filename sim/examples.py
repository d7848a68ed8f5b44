"""Example predictions of one unit for the overlay figure: a few lesion images per test centre
with the predicted mask, p̂, φ and the BI-RADS features of the predicted soft mask."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from common.birads import birads_features
from common.config import ALL_FEATURES
from common.data.tensors import TensorData


def pick_examples(model: torch.nn.Module, data: TensorData, probs: np.ndarray, p_mal: np.ndarray,
                  per_image: pd.DataFrame, k: int, centre: str) -> dict[str, np.ndarray]:
    """Up to ``k`` lesion images of one test centre (malignant first, then benign) with the
    prediction, p̂, φ and the BI-RADS feature values of the predicted soft mask.

    ``model`` is left as it was (device, train/eval mode): φ is computed on a CPU copy of its
    prior, because the caller may go on scoring or training the model."""
    lesion = np.flatnonzero(per_image["has_lesion"].to_numpy(bool))
    mal = [i for i in lesion if per_image["malignant"].iat[i] == 1]
    ben = [i for i in lesion if per_image["malignant"].iat[i] == 0]
    order = [x for pair in zip(mal, ben) for x in pair] + mal[len(ben):] + ben[len(mal):]
    idx = np.array(order[:k], dtype=int)
    if idx.size == 0:
        return {}
    prob_t = torch.from_numpy(probs[idx]).float()
    image_t = data.images[torch.from_numpy(idx)].float().cpu()
    prior = copy.deepcopy(model.prior).cpu().eval()
    with torch.no_grad():
        feats = birads_features(prob_t, image_t, None, ALL_FEATURES)
        cols = [ALL_FEATURES.index(n) for n in prior.names]
        phi = prior(feats[:, cols]).numpy()
    return {
        "images": image_t[:, 0].numpy(),
        "masks": data.masks[torch.from_numpy(idx)][:, 0].cpu().numpy(),
        "probs": probs[idx, 0],
        "p_hat": p_mal[idx],
        "phi": phi,
        "malignant": per_image["malignant"].to_numpy(float)[idx],
        "dice": per_image["dice"].to_numpy(float)[idx],
        "centres": np.array([centre] * idx.size),
        "case_ids": per_image["case_id"].to_numpy(str)[idx],
        "features": feats.numpy(),
        "feature_names": np.array(ALL_FEATURES),
        "prior_names": np.array(prior.names),
    }


def merge_examples(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One dict of the per-centre example arrays (names of features/prior taken once)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    fixed = ("feature_names", "prior_names")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in fixed}
    out.update({k: parts[0][k] for k in fixed})
    return out
