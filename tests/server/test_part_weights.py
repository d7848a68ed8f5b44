"""server/part_weights.py: the mask decoder averaged over the sites that trained it, the head over
those that trained it, the rest by num-examples; nothing changes for fully annotated sites."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from common.config import LossConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.fedconfig import ClientDPConfig
from common.losses import trained_parts
from server.part_weights import part_factors
from tests.server.local_grid import task_identity
from tests.server.test_strategy import _configure, _reply, _strategy, _train_metrics


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def metrics(n: float, decoder: float, head: float) -> dict[str, float]:
    return {**_train_metrics(n), "n_decoder": decoder, "n_head": head}


def test_a_labels_only_site_leaves_the_decoder_to_the_sites_with_masks() -> None:
    strat, _ = _strategy()
    glob = {"backbone.encoder.w": [0.0], "backbone.decoder.w": [0.0], "head.fc.w": [0.0],
            "backbone.decoder.num_updates": [7.0], "norm": [1.0]}
    sent = _configure(strat, glob)
    replies = [  # A: 1 image with mask and label; B: 3 with both; C: 4 with labels only
        _reply(sent[11], {**glob, "backbone.encoder.w": [1.0], "backbone.decoder.w": [1.0], "head.fc.w": [1.0]},
               metrics(1, 1, 1)),
        _reply(sent[22], {**glob, "backbone.encoder.w": [3.0], "backbone.decoder.w": [3.0], "head.fc.w": [3.0]},
               metrics(3, 3, 3)),
        _reply(sent[33], {**glob, "backbone.encoder.w": [5.0], "backbone.decoder.w": [0.0], "head.fc.w": [5.0]},
               metrics(4, 0, 4)),
    ]
    arrays, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["backbone.encoder.w"].numpy(), [(1 + 9 + 20) / 8])  # num-examples
    np.testing.assert_allclose(arrays["head.fc.w"].numpy(), [(1 + 9 + 20) / 8])  # every site has labels
    np.testing.assert_allclose(arrays["backbone.decoder.w"].numpy(), [(1 + 9) / 4], rtol=1e-6)  # A and B only
    np.testing.assert_allclose(arrays["backbone.decoder.num_updates"].numpy(), [7.0])


def test_fully_annotated_sites_and_fedmedian_and_client_dp_keep_the_plain_mean() -> None:
    assert part_factors([metrics(2, 2, 2), metrics(5, 5, 5)], "n_decoder") is None
    assert part_factors([metrics(2, 0, 2), metrics(5, 0, 5)], "n_decoder") == [0.0, 0.0]  # nobody: global
    assert part_factors([metrics(2, 1e9, 2), metrics(6, 6, 6)], "n_decoder") is None  # capped at num-examples
    assert part_factors([metrics(2, 1, 2), metrics(6, 6, 6)], "n_decoder") == pytest.approx([(1 / 7) / (2 / 8), (6 / 7) / (6 / 8)])
    assert _strategy()[0].part_weights and _strategy("fedadam")[0].part_weights
    assert not _strategy("fedmedian")[0].part_weights
    assert not _strategy(client_dp=ClientDPConfig(mode="server-fixed"), packed_weights=False)[0].part_weights


def test_trained_parts_follow_the_annotations_and_the_consistency_route() -> None:
    data = to_tensors(make_centre("SynES2", 12, size=32, seed=0), 32)
    lesion = int(data.has_lesion.sum())
    assert lesion < len(data)  # some normal images
    full = trained_parts(data, LossConfig(consistency=0.5, consistency_grad="classifier"))
    assert full == {"n_decoder": lesion, "n_head": len(data)}  # the decoder's weight: its lesions
    labels_only = data.without_negative_only_masks()
    hidden = type(data)(**{**data.__dict__, "has_mask": torch.zeros_like(data.has_mask)})
    assert trained_parts(hidden, LossConfig(consistency=0.5, consistency_grad="classifier"))["n_decoder"] == 0
    assert trained_parts(hidden, LossConfig(consistency=0.5, consistency_grad="mask"))["n_decoder"] == lesion
    assert trained_parts(hidden, LossConfig(consistency=0.0, consistency_grad="mask"))["n_decoder"] == 0
    assert labels_only is data  # lesion masks present: unchanged


def test_a_site_whose_only_masks_are_of_normal_images_trains_no_segmentation() -> None:
    data = to_tensors(make_centre("SynES2", 12, size=32, seed=0), 32)
    normals_only = type(data)(**{**data.__dict__, "has_mask": ~data.has_lesion})
    assert bool(normals_only.has_mask.any())
    assert not bool(normals_only.without_negative_only_masks().has_mask.any())
