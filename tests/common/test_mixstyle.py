"""MixStyle: identity in eval, statistics mixed (content kept) in training, refused under DP."""
import pytest
import torch

from common.config import PAPER_FEATURES, LossConfig, ModelConfig, TrainConfig
from common.data.synthetic import make_centre
from common.data.tensors import to_tensors
from common.model import build_model
from common.nets.mixstyle import MixStyle
from common.train import train_local


def _styled(b: int = 4, c: int = 3) -> torch.Tensor:
    """(B,C,8,8): one shared pattern under a different gain and offset per image and channel."""
    torch.manual_seed(0)
    pattern = torch.randn(1, c, 8, 8)
    gain = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1) * torch.ones(1, c, 1, 1)
    offset = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1) * 10
    return pattern * gain + offset


def test_eval_and_p0_are_identity():
    x = _styled()
    layer = MixStyle(1.0).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(MixStyle(0.0).train()(x), x)
    assert torch.equal(MixStyle(1.0).train()(x[:1]), x[:1])  # nothing to mix with


def test_training_mixes_statistics_and_keeps_the_standardised_content():
    x = _styled()
    torch.manual_seed(3)
    y = MixStyle(1.0, alpha=0.5).train()(x)
    mu_x, mu_y = x.mean((2, 3)), y.mean((2, 3))
    # each image's new mean is a convex mix of two images' means: inside the batch's range
    assert (mu_y >= mu_x.min() - 1e-4).all() and (mu_y <= mu_x.max() + 1e-4).all()
    assert not torch.allclose(mu_x, mu_y)
    # standardised content is unchanged: x and y correlate perfectly per image and channel
    zx = (x - mu_x[..., None, None]) / x.std((2, 3), keepdim=True)
    zy = (y - mu_y[..., None, None]) / y.std((2, 3), keepdim=True)
    assert torch.allclose(zx, zy, atol=1e-3)


def test_bad_probability_raises():
    with pytest.raises(ValueError, match="MixStyle"):
        MixStyle(1.5)
    with pytest.raises(ValueError, match="model.mixstyle"):
        build_model(ModelConfig(arch="small", mixstyle=0.5), PAPER_FEATURES)


def test_lite_encoder_with_mixstyle_keeps_its_state_dict_and_eval_output():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(arch="lite0", encoder_norm="affine"), PAPER_FEATURES)
    mixed = build_model(ModelConfig(arch="lite0", encoder_norm="affine", mixstyle=1.0), PAPER_FEATURES)
    assert list(plain.state_dict()) == list(mixed.state_dict())
    mixed.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32)
    plain.eval(), mixed.eval()
    with torch.no_grad():
        assert torch.equal(plain(x)[0], mixed(x)[0])
        plain.train(), mixed.train()
        assert not torch.allclose(plain.backbone(x)[0], mixed.backbone(x)[0])


def test_train_local_refuses_mixstyle_under_a_privacy_session():
    data = to_tensors(make_centre("SynPL", 4, size=32, seed=0), 32)
    model = build_model(ModelConfig(arch="lite0", mixstyle=0.5), PAPER_FEATURES)
    with pytest.raises(ValueError, match="mixstyle"):
        train_local(model, data, TrainConfig(epochs=1, batch_size=2, progress=False), LossConfig(),
                    privacy=object())  # refused before the session is used
