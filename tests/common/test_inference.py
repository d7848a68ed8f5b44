"""common/inference.py: the ensemble, the views and the post-processing, each on a case whose
answer is known by hand, and the depth shifts against the former single-model wrapper."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from common.config import InferenceConfig
from common.data.synthetic import make_centre
from common.data.tensors import normalise, to_tensors
from common.inference import Predictor, build_predictor, describe, evaluate, largest_component, predict
from common.tta import shift_up


class Tiny(nn.Module):
    """A fixed tiny network: conv → mask logits, pooled features → malignancy logit."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.mask = nn.Conv2d(4, 1, 1)
        self.cls = nn.Linear(4, 1)
        if symmetric:  # kernels equal to their mirror: the network commutes with the flip
            with torch.no_grad():
                self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x))
        return self.mask(f), self.cls(f.mean(dim=(2, 3))).reshape(-1)


class Constant(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.logit(torch.tensor(p)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logit.expand(x.shape[0], 1, *x.shape[2:]), self.logit.expand(x.shape[0])


class LeftHalf(nn.Module):
    """Mask logit +10 on the left half of whatever size it is given, −10 elsewhere; records sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(tuple(x.shape[-2:]))
        m = torch.full((x.shape[0], 1, *x.shape[2:]), -10.0)
        m[..., : x.shape[-1] // 2] = 10.0
        return m, torch.zeros(x.shape[0])


def former_depth_shift_tta(model: nn.Module, x: torch.Tensor, shifts: tuple[float, ...],
                           flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The former ``DepthShiftTTA.forward``, verbatim: what scored every earlier TTA result."""
    def probs(v):
        m, c = model(v)
        return torch.sigmoid(m), torch.sigmoid(c.reshape(-1))

    b, _, h, w = x.shape
    total, count = x.new_zeros(b, 1, h, w), x.new_zeros(b, 1, h, 1)
    p, c = probs(x)
    total += p
    count += 1
    cls = [c]
    if flip:
        p, c = probs(x.flip(-1))
        total += p.flip(-1)
        count += 1
        cls.append(c)
    for rows in (round(s * h) for s in shifts):
        p, _ = probs(shift_up(x, rows))
        total[..., rows:, :] += p[..., : h - rows, :]
        count[..., rows:, :] += 1
    return torch.logit(total / count, eps=1e-6), torch.logit(torch.stack(cls).mean(0), eps=1e-6)


def tiny(seed: int = 0, symmetric: bool = False) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(symmetric).eval()


def x_batch(n: int = 3, side: int = 32) -> torch.Tensor:
    return normalise(torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(1)))


@torch.no_grad()
def test_depth_shifts_give_the_former_numbers_exactly():
    model, x = tiny(), x_batch()
    for flip in (True, False):
        cfg = InferenceConfig(flip=flip, depth_shifts=(0.15, 0.3))
        got = build_predictor([model], cfg)(x)
        want = former_depth_shift_tta(model, x, (0.15, 0.3), flip)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@torch.no_grad()
def test_flip_of_a_mirror_symmetric_model_changes_nothing():
    model, x = tiny(symmetric=True), x_batch()
    m, c = model(x)
    torch.testing.assert_close(model(x.flip(-1))[0], m.flip(-1))  # the premise
    fm, fc = build_predictor([model], InferenceConfig(flip=True))(x)
    torch.testing.assert_close(torch.sigmoid(fm), torch.sigmoid(m), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.sigmoid(fc), torch.sigmoid(c), atol=1e-6, rtol=0)
    # ... while a model that only says "left" is told "right" by the mirror: 1/2 everywhere
    half, _ = build_predictor([LeftHalf()], InferenceConfig(flip=True))(torch.zeros(1, 1, 4, 6))
    torch.testing.assert_close(torch.sigmoid(half), torch.full_like(half, 0.5), atol=1e-6, rtol=0)


@torch.no_grad()
def test_one_member_without_views_is_the_member_itself():
    model, x = tiny(), x_batch()
    got, want = build_predictor([model], InferenceConfig())(x), model(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@torch.no_grad()
def test_ensemble_of_two_identical_models_is_one_model():
    model, x = tiny(), x_batch()
    cfg = InferenceConfig(flip=True, depth_shifts=(0.25,))
    one = build_predictor([model], cfg)(x)
    two = build_predictor([model, copy.deepcopy(model)], cfg)(x)
    for a, b in zip(one, two):
        torch.testing.assert_close(torch.sigmoid(a), torch.sigmoid(b), atol=1e-6, rtol=0)


@torch.no_grad()
def test_ensemble_averages_probabilities_not_logits():
    mask, cls = build_predictor([Constant(0.2), Constant(0.9)], InferenceConfig())(torch.zeros(3, 1, 4, 4))
    assert mask.shape == (3, 1, 4, 4) and cls.shape == (3,)
    torch.testing.assert_close(torch.sigmoid(mask), torch.full_like(mask, 0.55), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.sigmoid(cls), torch.full_like(cls, 0.55), atol=1e-6, rtol=0)


@torch.no_grad()
def test_members_at_two_sizes_each_see_their_own():
    small, native = LeftHalf(), LeftHalf()
    mask, cls = build_predictor([small, native], InferenceConfig(), sizes=[4, 8])(torch.rand(2, 1, 8, 8))
    assert small.seen == [(4, 4)] and native.seen == [(8, 8)]
    assert mask.shape == (2, 1, 8, 8) and cls.shape == (2,)
    prob = torch.sigmoid(mask)
    assert (prob[..., :3] > 0.99).all() and (prob[..., 5:] < 0.01).all()  # both agree away from the edge
    with pytest.raises(ValueError, match="2 sizes for 1 members"):
        Predictor([small], sizes=[4, 8])


def test_largest_component_keeps_the_bigger_blob_with_eight_connectivity():
    p = np.zeros((2, 1, 8, 8), np.float32)
    p[0, 0, 0:2, 0:2] = 0.9  # blob A: 4 pixels
    p[0, 0, 5, 5] = p[0, 0, 6, 6] = p[0, 0, 7, 7] = p[0, 0, 7, 6] = p[0, 0, 4, 4] = 0.8  # B: 5, diagonal
    p[0, 0, 0, 7] = 0.3  # below the threshold: not a component, cleared with the rest
    out = largest_component(p, 0.5)
    keep = np.zeros((8, 8), bool)
    keep[[4, 5, 6, 7, 7], [4, 5, 6, 7, 6]] = True
    assert np.array_equal(out[0, 0] > 0, keep) and np.array_equal(out[0, 0][keep], p[0, 0][keep])
    assert np.array_equal(out[1], p[1])  # nothing above the threshold: left as it is
    assert p[0, 0, 0, 0] == pytest.approx(0.9)  # the input is not modified
    assert np.array_equal(largest_component(p, 0.85)[0, 0] > 0, p[0, 0] >= 0.85)  # now A is the only one


@pytest.fixture(scope="module")
def data():
    return to_tensors(make_centre("SynES2", 6, size=16, seed=3), 16)


class TwoBlobs(nn.Module):
    """A big and a small square on every image, whatever it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.full_like(x[:, :1], -10.0)
        m[..., 2:8, 2:8] = 10.0
        m[..., 12:14, 12:14] = 10.0
        return m, torch.zeros(x.shape[0])


def test_predict_applies_the_largest_component_only_when_asked(data):
    net = TwoBlobs()
    plain, _ = predict(build_predictor([net], InferenceConfig()), data, InferenceConfig(), batch_size=4)
    cfg = InferenceConfig(largest_component=True)
    kept, p_mal = predict(build_predictor([net], cfg), data, cfg, batch_size=4)
    assert (plain > 0.5).sum(axis=(1, 2, 3)).tolist() == [40] * len(data)
    assert (kept > 0.5).sum(axis=(1, 2, 3)).tolist() == [36] * len(data)
    assert kept.shape == (len(data), 1, 16, 16) and p_mal.shape == (len(data),)
    res = evaluate(net, data, cfg, batch_size=4)  # a network is wrapped by the same path
    assert (res.per_image["pred_area"] == 36).all()


def test_describe_names_the_views():
    assert describe(InferenceConfig()) == "the raw model"
    text = describe(InferenceConfig(flip=True, depth_shifts=(0.15, 0.3), largest_component=True))
    assert text == ("image + mirror + shifted up by 0.15, 0.3 of the height; largest connected "
                    "component of the mask")
