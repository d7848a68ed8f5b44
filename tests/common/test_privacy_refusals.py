"""DP configurations that cannot keep the per-image guarantee are refused before training, with
the reason: MixStyle, channels-last, depth splicing, BatchNorm, δ ≥ 1/N, a missing init_from."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from common.config import (
    PAPER_FEATURES,
    AugmentConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    replace,
)
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.federation import build_experiment_model
from common.init_from import InitFromError
from common.model import build_model
from common.privacy import PrivacySession
from common.settings import settings_from_dict
from common.train import train_local

DP = PrivacyConfig(enabled=True, target_delta=1e-3)
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2)


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynPL", 16, size=32, seed=0), 32)


def session(n: int = 16, **kw) -> PrivacySession:
    return PrivacySession(dataclasses.replace(DP, **kw), num_examples=n, batch_size=4, epochs=1, site="A")


@pytest.mark.parametrize("change, reason", [
    ({"model": ModelConfig(arch="lite0", mixstyle=0.5)}, "model.mixstyle=0.5 mixes feature statistics"),
    ({"train": TrainConfig(channels_last=True)}, "train.channels_last: Opacus' per-sample conv gradients"),
    ({"data": DataConfig(augmentation=AugmentConfig(depth_splice=0.5))}, "depth_splice=0.5 splices another image"),
    ({"data": DataConfig(augment=False), "privacy": dataclasses.replace(DP, augmult=4)}, "needs data.augment"),
])
def test_incompatible_options_are_refused_when_the_experiment_is_read(change, reason) -> None:
    privacy = change.get("privacy", DP)
    ExperimentConfig(**{**change, "privacy": dataclasses.replace(privacy, enabled=False)})  # fine without DP
    with pytest.raises(ConfigError, match=re.escape("privacy.")) as err:
        ExperimentConfig(**{**change, "privacy": privacy})
    assert reason in str(err.value)


def test_a_settings_document_names_the_refusal() -> None:
    with pytest.raises(ConfigError, match="privacy.enabled: model.mixstyle"):
        settings_from_dict({"preset": "recommended", "privacy": {"enabled": True}}, "doc")
    ok = settings_from_dict({"preset": "recommended", "privacy": {"enabled": True},
                             "model": {"mixstyle": 0}, "train": {"channels_last": False},
                             "data": {"augmentation": {"depth_splice": 0}}}, "doc")
    assert ok.experiment.privacy.enabled


def test_train_local_refuses_them_too_when_a_site_switches_dp_on(data) -> None:
    # a site's own terms can turn DP on under a coordinator's experiment that never checked it
    sess = session()
    for kw, augment, reason in (({"channels_last": True}, False, "channels_last"),
                                ({}, AugmentConfig(depth_splice=0.3), "depth_splice")):
        with pytest.raises(ValueError, match=f"refused before training: .*{reason}"):
            train_local(build_model(TINY, PAPER_FEATURES), data, TrainConfig(epochs=1, batch_size=4, progress=False, **kw),
                        LossConfig(pos_weight=1.0), privacy=sess, augment=augment)
    assert sess.steps == 0


def test_batchnorm_is_refused_by_the_session_before_any_step(data) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    sess = session()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="BatchNorm layer.*GroupNorm"):
        sess.wrap(model, opt, data, batch_size=4, generator=torch.Generator().manual_seed(0), extra_grad=None)
    assert sess.steps == 0 and sess.history == []


@pytest.mark.parametrize("n, delta, refused", [(16, 1 / 16, True), (16, 0.07, True), (16, 0.06, False),
                                               (1000, 1e-3, True), (1000, 9e-4, False)])
def test_delta_at_or_above_one_over_n_is_refused_at_session_start(n, delta, refused) -> None:
    if refused:
        with pytest.raises(ValueError, match=rf"target_delta={delta:g} is >= 1/N .*N = {n} training images"):
            session(n, target_delta=delta)
    else:
        assert session(n, target_delta=delta).num_examples == n


def test_a_missing_init_from_is_refused_naming_the_path(tmp_path) -> None:
    path = tmp_path / "public" / "model.pt"
    with pytest.raises(InitFromError, match=f"model.init_from: {path}: no such file"):
        build_experiment_model(ExperimentConfig(model=replace(TINY, init_from=str(path))))
