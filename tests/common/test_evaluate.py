import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from common.data.synthetic import make_centre
from common.data.tensors import normalise, to_tensors
from common.evaluate import PER_IMAGE_COLUMNS, SUMMARY_KEYS, predict, score
from common.inference import evaluate  # the default InferenceConfig: the raw network

SIZE = 32


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynES2", 12, size=SIZE, seed=3), SIZE)


class Oracle(nn.Module):
    """Looks each input up among the dataset's images and answers with its ground truth."""

    def __init__(self, data):
        super().__init__()
        self.keys = normalise(data.images).flatten(1)
        self.masks, self.y = data.masks, data.malignant
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        idx = torch.cdist(x.flatten(1), self.keys).argmin(1)
        return (self.masks[idx] * 2 - 1) * 20.0, (self.y[idx] * 2 - 1) * 20.0


class Blind(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.full_like(x[:, :1], -20.0), torch.zeros(x.shape[0])


def test_fixture_has_both_classes_and_normals(data):
    assert 0 < int(data.malignant.sum()) < len(data)
    assert int(data.has_lesion.sum()) < len(data)  # some normal images


def test_oracle_scores_perfectly(data):
    res = evaluate(Oracle(data), data, batch_size=5)
    s = res.summary
    assert list(s) == list(SUMMARY_KEYS)
    assert s["dice"] == 1.0 and s["iou"] == 1.0 and s["hd95"] == 0.0
    assert s["auc"] == 1.0 and s["sensitivity"] == 1.0 and s["specificity"] == 1.0
    assert s["accuracy"] == 1.0
    assert s["n_images"] == len(data) and s["n_lesion"] == int(data.has_lesion.sum())
    df = res.per_image
    assert list(df.columns) == list(PER_IMAGE_COLUMNS) and len(df) == len(data)
    assert df.loc[~df.has_lesion, "dice"].isna().all()  # Dice undefined on normal images
    assert list(df.case_id) == list(data.case_ids)


def test_blind_model_gets_zero_dice_and_diagonal_hd95(data):
    res = evaluate(Blind(), data)
    s = res.summary
    assert s["dice"] == 0.0 and s["auc"] == 0.5
    assert s["hd95"] == pytest.approx(math.hypot(SIZE, SIZE))
    assert s["sensitivity"] == 1.0 and s["specificity"] == 0.0  # p = 0.5 ≥ threshold
    assert (res.per_image.pred_area == 0).all()


def test_predict_shapes_order_and_mode(data):
    model = Oracle(data).train()
    probs, mal = predict(model, data, batch_size=7)
    assert probs.shape == (len(data), 1, SIZE, SIZE) and probs.dtype == np.float32
    assert mal.shape == (len(data),) and mal.dtype == np.float32
    assert np.array_equal(probs > 0.5, data.masks.numpy() > 0.5)
    assert model.training


def test_score_hd95_mm_uses_spacing(data):
    spacing = data.spacing_mm.clone()
    spacing[::2] = float("nan")  # unknown spacing → NaN in mm, px still defined
    data = dataclasses.replace(data, spacing_mm=spacing)
    probs = data.masks.numpy().copy()
    probs = np.roll(probs, 2, axis=-1)  # shift every mask 2 px right
    res = score(probs, data.malignant.numpy(), data)
    df = res.per_image[res.per_image.has_lesion]
    sp = data.spacing_mm.numpy()[res.per_image.has_lesion.to_numpy()]
    known = np.isfinite(sp)
    assert np.allclose(df.hd95_mm.to_numpy()[known], df.hd95_px.to_numpy()[known] * sp[known])
    assert known.any() and (~known).any()
    assert np.isnan(df.hd95_mm.to_numpy()[~known]).all() and np.isfinite(df.hd95_px).all()
    assert (df.hd95_px <= 2.0 + 1e-9).all() and (df.dice < 1).any()


def test_unknown_masks_and_labels_are_not_scored_as_empty_or_benign(data):
    """Partial annotations: an image without a known mask has no Dice (not a Dice against an
    empty mask), an image without a known label is left out of AUC and accuracy."""
    oracle = Oracle(data)
    full = evaluate(oracle, data, batch_size=6).summary
    lesion = data.has_lesion.numpy().nonzero()[0]
    has_mask = torch.ones(len(data), dtype=torch.bool)
    has_mask[lesion[:2]] = False
    has_label = torch.ones(len(data), dtype=torch.bool)
    has_label[0] = False
    masks = data.masks.clone()
    masks[lesion[:2]] = 0.0  # what a reader stores for an unknown mask
    partial = dataclasses.replace(data, masks=masks, has_mask=has_mask, has_label=has_label)
    res = evaluate(Oracle(data), partial, batch_size=6)  # the oracle still knows the true masks
    s = res.summary
    assert s["dice"] == 1.0 and s["n_lesion"] == full["n_lesion"] - 2
    assert res.per_image["dice"].iloc[lesion[:2]].isna().all()
    assert s["auc"] == 1.0 and s["accuracy"] == 1.0
