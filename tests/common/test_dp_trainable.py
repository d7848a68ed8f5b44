"""privacy.trainable: norms — only per-channel affines, biases, the mask output and the heads
train under DP-SGD, and Opacus' per-sample gradients of the folded-BatchNorm affine are exact."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import PAPER_FEATURES, LossConfig, ModelConfig, PrivacyConfig, TrainConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.dp_trainable import frozen_for_dp, register_grad_samplers
from common.model import build_model
from common.nets.efficientnet import ChannelAffine
from common.privacy import PrivacySession
from common.train import train_local

SIZE, N, B = 32, 24, 8
TINY = ModelConfig(base_channels=4, depth=2, num_groups=2, dropout=0.0)


def test_norms_leaves_out_every_convolution_weight_but_the_mask_output() -> None:
    model = build_model(TINY, PAPER_FEATURES)
    frozen = {n for n, _ in frozen_for_dp(model, "norms")}
    named = dict(model.named_parameters())
    trained = set(named) - frozen
    assert frozen and all(named[n].dim() == 4 for n in frozen)  # conv kernels only
    gn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.GroupNorm)
          for p, _ in mod.named_parameters(recurse=False)}
    assert gn and gn <= trained
    assert {n for n in named if n.startswith(("head.", "prior."))} <= trained
    assert sum(named[n].numel() for n in trained) < 0.2 * sum(p.numel() for p in named.values())


def test_unknown_mode_and_a_model_without_norms_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown 'encoder'"):
        frozen_for_dp(build_model(TINY, PAPER_FEATURES), "encoder")
    with pytest.raises(ValueError, match="no GroupNorm"):
        frozen_for_dp(nn.Sequential(nn.Conv2d(1, 2, 3)), "norms")


def test_channel_affine_per_sample_gradients_equal_one_image_at_a_time() -> None:
    from opacus import GradSampleModule

    register_grad_samplers()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), ChannelAffine(3), nn.ReLU(), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
    x = torch.randn(4, 1, 6, 6)
    expected = []
    for i in range(len(x)):  # before wrapping: plain autograd, one image at a time
        net.zero_grad()
        net(x[i:i + 1]).pow(2).sum().backward()
        expected.append([p.grad.clone() for p in net[1].parameters()])
    gsm = GradSampleModule(net, loss_reduction="sum")
    gsm(x).pow(2).sum().backward()
    for i, grads in enumerate(expected):
        for p, g in zip(net[1].parameters(), grads):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-5)
    gsm._close()


@pytest.mark.parametrize("arch", ["small", "lite0"])
def test_dp_sgd_with_norms_updates_only_them(arch: str) -> None:
    torch.manual_seed(0)
    cfg = TINY if arch == "small" else ModelConfig(arch="lite0", encoder_norm="affine", dropout=0.0)
    model = build_model(cfg, PAPER_FEATURES)
    data = to_tensors(make_centre("SynPL", N, size=SIZE, seed=0), SIZE)
    frozen = {n for n, _ in frozen_for_dp(model, "norms")}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    sess = PrivacySession(PrivacyConfig(enabled=True, target_epsilon=8.0, target_delta=1e-3, planned_epochs=1,
                                        trainable="norms"), num_examples=N, batch_size=B, epochs=1, site="A")
    train_local(model, data, TrainConfig(epochs=1, batch_size=B, lr=0.05, optimizer="sgd", progress=False,
                                         device="cpu", num_threads=1, encoder_lr_scale=0.3),
                LossConfig(pos_weight=1.0), privacy=sess, augment=False)
    with_gs = {n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
    sess.close()
    state = model.state_dict()
    named = {n for n, _ in model.named_parameters()}
    assert with_gs == named - frozen
    assert all(torch.equal(state[k], start[k]) for k in frozen)
    assert all(not torch.equal(state[k], start[k]) for k in named - frozen)  # each one noised at least
    if arch == "lite0":
        assert any(isinstance(m, ChannelAffine) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_norms_without_a_model_that_segments_is_refused(tmp_path) -> None:
    from common.config import ConfigError
    from common.settings import load_settings

    with pytest.raises(ConfigError, match="model.init_from"):
        load_settings("smoke", ["privacy.enabled=true", "privacy.trainable=norms"])
    with pytest.raises(ConfigError, match="sim.public_centres"):
        load_settings("smoke", ["sim.epsilons=[8]", "privacy.trainable=norms"])
    ok = load_settings("smoke", ["sim.epsilons=[8]", "privacy.trainable=norms", "sim.public_centres=[SynES1]"])
    assert ok.experiment.privacy.trainable == "norms"
    assert load_settings("smoke", ["privacy.trainable=norms"]).experiment.privacy.trainable == "norms"  # no DP: inert


def test_a_deployment_with_norms_needs_the_public_model_file() -> None:
    from common.config import ConfigError
    from common.federation import spec_from_dict

    doc = {"experiment": {"preset": "smoke", "privacy": {"enabled": True, "trainable": "norms"},
                          "sim": {"public_centres": ["SynES1"]}},  # the simulation's key does not count here
           "sites": [{"name": "udiat", "synthetic_centre": "SynPL"}], "run_dir": "run"}
    with pytest.raises(ConfigError, match="model.init_from"):
        spec_from_dict(doc, "federation.yaml")
