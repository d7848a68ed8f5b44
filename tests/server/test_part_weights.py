"""server/part_weights.py: the mask decoder averaged over the sites that trained it, the head over
those that trained it, the rest by num-examples; nothing changes for fully annotated sites."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import LossConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.configtools import ConfigError
from common.fedconfig import ClientDPConfig, FederationConfig, SecAggConfig
from common.losses import trained_parts
from server.part_weights import MAX_STEP_FACTOR, part_factors, step_factors
from client.app import make_client_app
from server.app import run_federation
from tests.server.local_grid import SITES, LocalGrid, task_identity, tiny_spec
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


def test_fednova_step_factors_by_hand() -> None:
    # batch 2: A 2 images → 1 step, B 6 → 3 steps; τ̄ by images = (2·1 + 6·3)/8 = 2.5
    by_images = step_factors([metrics(2, 2, 2), metrics(6, 6, 6)], None, 2)
    assert by_images == pytest.approx([2.5, 2.5 / 3])
    # the decoder's weights by lesions: A 2, B 2 → τ̄ = (2·1 + 2·3)/4 = 2
    assert step_factors([metrics(2, 2, 2), metrics(6, 2, 6)], "n_decoder", 2) == pytest.approx([2.0, 2 / 3])
    # one image among a thousand: τ̄/τ = 125/1 is capped, so it cannot outweigh its share 4×
    tiny = step_factors([metrics(1, 1, 1), metrics(1000, 1000, 1000), metrics(1000, 1000, 1000)], None, 8)
    assert tiny[0] == MAX_STEP_FACTOR and tiny[1] == pytest.approx(tiny[2]) and tiny[1] < 1.0
    assert step_factors([metrics(4, 0, 4), metrics(4, 0, 4)], "n_decoder", 2) == [1.0, 1.0]  # nobody: global


def test_fednova_aggregates_the_step_normalised_updates_and_leaves_buffers_to_the_mean() -> None:
    glob = {"backbone.encoder.w": [0.0], "backbone.decoder.w": [0.0], "head.fc.w": [0.0], "stat": [0.0]}
    out = []
    for strat, _ in (_strategy("fednova", batch_size=2), _strategy("fedavg")):
        sent = _configure(strat, glob)
        replies = [  # batch 2. A: 2 images, all lesions, 1 step; B: 6 images, 2 lesions, 3 steps
            _reply(sent[11], {k: [1.0] for k in glob}, metrics(2, 2, 2)),
            _reply(sent[22], {k: [1.5] for k in glob}, metrics(6, 2, 6)),
        ]
        arrays, _ = strat.aggregate_train(1, replies)
        out.append({k: float(arrays[k].numpy()[0]) for k in glob})
    nova, mean = out
    # by images: τ̄ = (2·1 + 6·3)/8 = 2.5; 2.5 · (2/8 · 1/1 + 6/8 · 1.5/3) = 1.5625, FedAvg 11/8
    assert nova["backbone.encoder.w"] == pytest.approx(1.5625) and nova["head.fc.w"] == pytest.approx(1.5625)
    assert mean["backbone.encoder.w"] == pytest.approx(11 / 8)
    # the decoder by lesions (2 and 2): τ̄ = 2; 2 · (1/2 · 1/1 + 1/2 · 1.5/3) = 1.5, FedAvg 1.25
    assert nova["backbone.decoder.w"] == pytest.approx(1.5) and mean["backbone.decoder.w"] == pytest.approx(1.25)
    assert nova["stat"] == pytest.approx(mean["stat"]) == pytest.approx(11 / 8)  # buffers: the mean


def test_fednova_needs_the_sites_updates_one_by_one() -> None:
    assert _strategy("fednova")[0].step_batch == 1 and _strategy("fedavg")[0].step_batch is None
    with pytest.raises(ConfigError, match="fednova"):
        FederationConfig(strategy="fednova", secagg=SecAggConfig(enabled=True))


def test_a_fednova_federation_of_unequal_sites_counts_their_steps_and_finishes(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "run", rounds=1, strategy="fednova")
    sites = tuple(dataclasses.replace(s, synthetic_n=n) for s, n in zip(spec.sites, (8, 16, 40)))
    spec = dataclasses.replace(spec, sites=sites)
    nodes = {1000 + i: {"partition-id": i, "num-partitions": len(SITES)} for i in range(len(SITES))}
    folder = run_federation(LocalGrid(make_client_app(spec), nodes), spec)
    assert folder.read_status()["state"] == "finished"
    log = (Path(spec.run_dir) / "server.log").read_text()
    line = next(x for x in log.splitlines() if "round 1: * updates weighted" in x and "local steps" in x)
    factors = [float(f) for f in line.split("factors [")[1].rstrip("])").split(",")]
    assert factors[0] > 1.0 > factors[2]  # the smallest site's steps count up, the largest's down
