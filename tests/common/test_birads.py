"""BI-RADS features on hand-made shapes whose answers are known, and the prior's constraints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.birads import (
    CLINICAL_SIGN,
    FEATURE_NAMES,
    BiradsPrior,
    birads_features,
    lesion_area_mm2,
)
from common.config import ALL_FEATURES, PAPER_FEATURES

torch.set_num_threads(1)


def shape(size: int, radius: float, kind: str = "disc", *, cx: float | None = None,
          cy: float | None = None, ax: float = 1.0, ay: float = 1.0, spikes: int = 8,
          amp: float = 0.35, ss: int = 4) -> torch.Tensor:
    """(1,1,S,S) anti-aliased mask (4× supersampled) of a disc / ellipse / star."""
    n = size * ss
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(c, c, indexing="ij")
    cx = size / 2 if cx is None else cx
    cy = size / 2 if cy is None else cy
    u, v = (x - cx) / ax, (y - cy) / ay
    rr, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    limit = radius * (1 + amp * torch.cos(spikes * theta)) if kind == "star" else radius
    return F.avg_pool2d((rr <= limit).float().view(1, 1, n, n), ss)


def feats(prob: torch.Tensor, image: torch.Tensor | None = None, names=FEATURE_NAMES) -> dict:
    if image is None:
        image = 0.6 - 0.3 * prob
    out = birads_features(prob, image, None, names)
    return {n: out[:, i] for i, n in enumerate(names)}


def test_names_and_signs_match_config() -> None:
    assert FEATURE_NAMES == ALL_FEATURES
    assert set(CLINICAL_SIGN) == set(ALL_FEATURES)
    assert CLINICAL_SIGN["margin_sharpness"] == -1
    assert all(CLINICAL_SIGN[n] == 1 for n in ALL_FEATURES if n != "margin_sharpness")


@pytest.mark.parametrize("size", [64, 128])
def test_disc_compactness_is_one_and_star_is_rougher(size: int) -> None:
    prob = torch.cat([shape(size, 0.25 * size), shape(size, 0.25 * size, "star")])
    f = feats(prob)
    assert abs(f["compactness"][0].item() - 1.0) < 0.05
    assert f["compactness"][1] > 1.8 * f["compactness"][0]
    assert 0.0 <= f["roughness"][0].item() < 0.06
    assert f["roughness"][1] > 0.2 > f["roughness"][0]


def test_square_compactness_is_four_over_pi() -> None:
    prob = torch.zeros(1, 1, 128, 128)
    prob[..., 40:90, 30:80] = 1.0
    assert feats(prob)["compactness"].item() == pytest.approx(4 / math.pi, rel=0.05)


def test_area_is_sqrt_of_fraction() -> None:
    prob = torch.zeros(2, 1, 64, 64)
    prob[0, :, :32, :32] = 1.0  # a quarter of the image
    prob[1] = 0.5  # soft half everywhere
    assert feats(prob)["area"].tolist() == pytest.approx([0.5, math.sqrt(0.5)], abs=2e-3)


def test_area_mm2_uses_spacing_and_is_nan_when_unknown() -> None:
    prob = torch.zeros(2, 1, 16, 16)
    prob[..., :4, :5] = 1.0
    area = lesion_area_mm2(prob, torch.tensor([0.5, float("nan")]))
    assert area[0].item() == pytest.approx(20 * 0.25)
    assert torch.isnan(area[1])


def test_scaling_a_shape_keeps_compactness_and_roughness() -> None:
    small = torch.cat([shape(128, 18, ax=1.4, ay=0.8), shape(128, 18, "star", spikes=5, amp=0.2)])
    big = torch.cat([shape(128, 36, ax=1.4, ay=0.8), shape(128, 36, "star", spikes=5, amp=0.2)])
    fs, fb = feats(small), feats(big)
    assert fs["compactness"].tolist() == pytest.approx(fb["compactness"].tolist(), rel=0.1)
    assert fs["orientation"].tolist() == pytest.approx(fb["orientation"].tolist(), abs=0.03)
    # the star's lobes stay visible to the lesion-relative roughness blur at both sizes
    assert fs["roughness"][1].item() == pytest.approx(fb["roughness"][1].item(), rel=0.35)


def test_same_shape_at_two_resolutions_agrees() -> None:
    lo = feats(shape(64, 16, ax=1.3, ay=0.7), names=("area", "compactness", "orientation"))
    hi = feats(shape(128, 32, ax=1.3, ay=0.7), names=("area", "compactness", "orientation"))
    for name in lo:
        assert lo[name].item() == pytest.approx(hi[name].item(), rel=0.05, abs=0.01), name


def test_orientation_sign_and_value() -> None:
    prob = torch.cat([shape(96, 14, ax=0.6, ay=1.2), shape(96, 14, ax=1.2, ay=0.6), shape(96, 20)])
    o = feats(prob, names=("orientation",))["orientation"]
    assert o[0].item() == pytest.approx(math.log(2.0), abs=0.05)  # taller than wide: +log(2)
    assert o[1].item() == pytest.approx(-math.log(2.0), abs=0.05)
    assert abs(o[2].item()) < 0.01


def test_translation_leaves_features_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    size = 128  # every region a feature reads (±side/4 beside, side/8 beneath) stays inside
    prob = shape(size, 10, "star", cx=50, cy=40, spikes=6, amp=0.25)
    image = 0.55 + 0.05 * torch.randn(1, 1, size, size, generator=gen) - 0.3 * prob
    moved_p = torch.roll(prob, shifts=(12, 15), dims=(2, 3))
    moved_i = torch.roll(image, shifts=(12, 15), dims=(2, 3))
    a, b = feats(prob, image), feats(moved_p, moved_i)
    for name in FEATURE_NAMES:
        assert a[name].item() == pytest.approx(b[name].item(), rel=0.03, abs=0.01), name


def test_texture_higher_for_noisy_interior() -> None:
    gen = torch.Generator().manual_seed(1)
    prob = shape(64, 16).repeat(2, 1, 1, 1)
    background = 0.6 + 0.03 * torch.randn(1, 1, 64, 64, generator=gen)
    flat = background - 0.3 * prob[:1]
    noisy = flat + 0.15 * torch.randn(1, 1, 64, 64, generator=gen) * prob[:1]
    t = feats(prob, torch.cat([flat, noisy]), names=("texture",))["texture"]
    assert t[1] > 2.0 * t[0]


def test_margin_sharpness_higher_for_sharp_edge_and_contrast_sign_free() -> None:
    size = 64
    prob = shape(size, 16).repeat(3, 1, 1, 1)
    sharp = 0.7 - 0.4 * prob[:1]  # hypoechoic, step edge
    blurred = 0.7 - 0.4 * _gauss_blur(prob[:1], 3.0)
    bright = 0.3 + 0.4 * prob[:1]  # hyperechoic lesion, same edge
    m = feats(prob, torch.cat([sharp, blurred, bright]), names=("margin_sharpness",))
    m = m["margin_sharpness"]
    assert m[0] > 2.0 * m[1]
    assert m[2].item() == pytest.approx(m[0].item(), rel=0.01)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def test_posterior_detects_shadow_and_enhancement() -> None:
    size = 64
    gen = torch.Generator().manual_seed(2)
    prob = shape(size, 8, cx=32, cy=20).repeat(3, 1, 1, 1)
    base = 0.5 + 0.03 * torch.randn(1, 1, size, size, generator=gen) - 0.3 * prob[:1]
    column = torch.zeros(1, 1, size, size)
    column[..., 28:, 24:40] = 1.0  # beneath the lesion (rows 12–28)
    column = column * (1 - prob[:1])
    shadow, enhance = base - 0.3 * column, base + 0.3 * column
    p = feats(prob, torch.cat([base, shadow, enhance]), names=("posterior",))["posterior"]
    assert abs(p[0].item()) < 0.5
    assert p[1] > p[0] + 2.0
    assert p[2] < p[0] - 2.0


@pytest.mark.parametrize("case", ["empty", "full", "one_pixel", "uniform_half", "tiny_soft"])
def test_values_and_gradients_are_finite(case: str) -> None:
    prob = torch.zeros(2, 1, 32, 32)
    if case == "full":
        prob[:] = 1.0
    elif case == "one_pixel":
        prob[:, :, 10, 20] = 1.0
    elif case == "uniform_half":
        prob[:] = 0.5
    elif case == "tiny_soft":
        prob[:] = 1e-4
    prob.requires_grad_(True)
    image = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    image.requires_grad_(True)
    out = birads_features(prob, image)
    assert out.shape == (2, len(FEATURE_NAMES))
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(prob.grad).all() and torch.isfinite(image.grad).all()
    assert prob.grad.abs().max() < 1e6


def test_gradcheck_against_finite_differences() -> None:
    gen = torch.Generator().manual_seed(4)
    prob = (0.1 + 0.8 * torch.rand(1, 1, 12, 12, generator=gen, dtype=torch.float64))
    image = torch.rand(1, 1, 12, 12, generator=gen, dtype=torch.float64)
    prob.requires_grad_(True)
    image.requires_grad_(True)
    # roughness is excluded: its blur scale follows the lesion size and is deliberately not
    # differentiated, so finite differences (which move the size) see an extra term.
    names = tuple(n for n in FEATURE_NAMES if n != "roughness")
    assert torch.autograd.gradcheck(
        lambda p, i: birads_features(p, i, None, names), (prob, image), eps=1e-6, atol=1e-4
    )


def test_roughness_gradient_reaches_the_mask() -> None:
    prob = shape(48, 12, "star").requires_grad_(True)
    birads_features(prob, None, None, ("roughness",)).sum().backward()
    assert prob.grad.abs().sum() > 0


def test_batch_equals_one_by_one_and_names_select_columns() -> None:
    prob = torch.cat([shape(48, 6), shape(48, 14, "star"), torch.zeros(1, 1, 48, 48)])
    image = 0.6 - 0.3 * prob
    batch = birads_features(prob, image)
    single = torch.cat([birads_features(prob[i : i + 1], image[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, rtol=1e-4, atol=1e-5)
    sub = birads_features(prob, image, None, ("orientation", "area"))
    names = list(FEATURE_NAMES)
    assert torch.allclose(sub, batch[:, [names.index("orientation"), names.index("area")]])
    with pytest.raises(ValueError, match="unknown"):
        birads_features(prob, image, None, ("area", "spiculation"))
    with pytest.raises(ValueError, match="need the image"):
        birads_features(prob, None, None, ("texture",))


# ---------------------------------------------------------------- prior


def test_prior_sign_constraint_survives_adversarial_steps() -> None:
    prior = BiradsPrior(ALL_FEATURES)
    assert all(abs(w - 0.5 * CLINICAL_SIGN[n]) < 1e-5 for n, w in prior.weights().items())
    opt = torch.optim.Adam(prior.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(5)
    feats_ = torch.randn(64, len(ALL_FEATURES), generator=gen)
    # labels that are anti-clinical: malignant exactly when the signed evidence is low
    anti = ((feats_ * torch.tensor([CLINICAL_SIGN[n] for n in ALL_FEATURES])).sum(1) < 0).float()
    for _ in range(100):
        opt.zero_grad()
        F.binary_cross_entropy(prior(feats_), anti).backward()
        opt.step()
    for name, w in prior.weights().items():
        assert w * CLINICAL_SIGN[name] >= 0.05 - 1e-6, (name, w)
    free = BiradsPrior(ALL_FEATURES, sign_constrained=False)
    opt = torch.optim.Adam(free.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.binary_cross_entropy(free(feats_), anti).backward()
        opt.step()
    assert any(w * CLINICAL_SIGN[n] < 0 for n, w in free.weights().items())  # it could flip


def test_prior_running_stats_train_vs_eval_and_track_mask() -> None:
    prior = BiradsPrior(PAPER_FEATURES)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0], [100.0, 100.0, 100.0, 100.0]])
    phi = prior(x, track=torch.tensor([True, True, False]))
    assert phi.shape == (3,) and ((phi > 0) & (phi < 1)).all()
    assert prior.running_mean.tolist() == pytest.approx([2.0, 2.0, 2.0, 2.0])  # first: average
    assert prior.running_var.tolist() == pytest.approx([2.0, 0.0 + 1e-6, 2.0, 8.0], rel=1e-3)
    prior.eval()
    before = prior.running_mean.clone()
    prior(torch.randn(5, 4))
    assert torch.equal(prior.running_mean, before)
    prior.train()
    prior(torch.randn(1, 4))  # a batch of one updates the mean only, never NaN
    assert torch.isfinite(prior.running_var).all() and prior.num_updates.item() == 2


def test_prior_state_dict_round_trip() -> None:
    a = BiradsPrior(ALL_FEATURES)
    a(torch.randn(16, 7, generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():
        a.head.raw_weight.add_(torch.linspace(-1, 1, 7))
        a.head.bias.fill_(0.3)
    state = a.state_dict()
    assert {"running_mean", "running_var", "num_updates", "head.raw_weight", "head.bias"} <= set(
        state
    )
    b = BiradsPrior(ALL_FEATURES)
    b.load_state_dict(state)
    a.eval(), b.eval()
    x = torch.randn(4, 7)
    assert torch.allclose(a(x), b(x))
    assert a.weights() == b.weights()


def test_prior_per_sample_gradients_under_opacus() -> None:
    from opacus import GradSampleModule

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prior = BiradsPrior(PAPER_FEATURES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.prior(x)

    model = GradSampleModule(Holder(), loss_reduction="sum")
    x = torch.randn(5, 4, requires_grad=True)
    model(x).sum().backward()
    grad_sample = model._module.prior.head.raw_weight.grad_sample
    assert grad_sample.shape == (5, 4)
    assert torch.allclose(grad_sample.sum(0), model._module.prior.head.raw_weight.grad, atol=1e-6)
