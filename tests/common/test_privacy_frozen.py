"""privacy.trainable: decoder — the encoder is frozen before Opacus wraps the model, so
per-sample gradients exist only for the decoder, heads and prior, and only they are optimised."""
from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from common.config import (
    PAPER_FEATURES,
    LossConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.model import build_model
from common.privacy import PrivacySession
from common.train import ENCODER_PREFIX, train_local

SIZE, N, B = 32, 24, 8
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2, dropout=0.0)


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynPL", N, size=SIZE, seed=0), SIZE)


def dp(trainable: str) -> PrivacySession:
    cfg = PrivacyConfig(enabled=True, target_epsilon=8.0, target_delta=1e-3, planned_epochs=1,
                        trainable=trainable)
    return PrivacySession(cfg, num_examples=N, batch_size=B, epochs=1, site="A")


def train(model, data, sess, **kw):
    return train_local(model, data, TrainConfig(epochs=1, batch_size=B, lr=0.05, optimizer="sgd",
                                                progress=False, device="cpu", num_threads=1, **kw),
                       LossConfig(pos_weight=1.0), privacy=sess, augment=False)


@pytest.mark.parametrize("trainable", ["all", "decoder"])
def test_per_sample_gradients_and_the_optimiser_cover_only_trainable_parameters(data, trainable) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, PAPER_FEATURES)
    assert ModuleValidator.validate(model, strict=True) == []  # Opacus can privatise the network
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sess = dp(trainable)
    train(model, data, sess, encoder_lr_scale=0.3)  # the encoder's lr group has nothing to hold
    named = dict(model.named_parameters())
    with_gs = {n for n, p in named.items() if getattr(p, "grad_sample", None) is not None}
    optimised = {id(p) for p in sess._optimizer.params}
    sess.close()
    encoder = {n for n in named if n.startswith(ENCODER_PREFIX)}
    rest = set(named) - encoder
    assert encoder and rest
    expected = rest if trainable == "decoder" else set(named)
    assert with_gs == expected
    assert optimised == {id(named[n]) for n in expected}
    state = model.state_dict()
    frozen_kept = all(torch.equal(state[k], start[k]) for k in encoder)
    assert frozen_kept == (trainable == "decoder")
    assert any(not torch.equal(state[k], start[k]) for k in rest)
    assert all(p.requires_grad for p in model.parameters())  # restored for the caller


def test_decoder_only_needs_an_encoder(data) -> None:
    class NoEncoder(torch.nn.Module):  # a network whose parameters are all outside backbone.encoder
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model(TINY, PAPER_FEATURES)
            self.prior = self.inner.prior

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match="no 'backbone.encoder"):
        train(NoEncoder(), data, dp("decoder"))


def test_trainable_is_validated() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.trainable"):
        PrivacyConfig(trainable="encoder")


def test_a_prior_out_of_the_loss_during_the_warm_up_still_trains_under_dp(data) -> None:
    """While λ is 0 no gradient reaches the prior; Opacus needs a per-sample gradient for every
    parameter it noises, so the unused ones get zeros rather than stopping the run."""
    torch.manual_seed(0)
    model = build_model(TINY, PAPER_FEATURES)
    before = [p.detach().clone() for p in model.prior.parameters()]
    sess = dp("decoder")
    train_local(model, data, TrainConfig(epochs=1, batch_size=B, lr=0.05, optimizer="sgd", progress=False,
                                         device="cpu", num_threads=1),
                LossConfig(pos_weight=1.0, consistency=0.5, consistency_warmup_epochs=5),
                privacy=sess, augment=False)
    sess.close()
    after = list(model.prior.parameters())
    assert before and all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # noised like every trainable parameter
