"""MultiTaskLoss: parts, arms, gradient routing, degenerate batches, and that it trains."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.birads import BiradsPrior
from common.config import PAPER_FEATURES, LossConfig, replace
from common.losses import PART_KEYS, MultiTaskLoss, focal_loss, soft_dice_loss

torch.set_num_threads(1)
SIZE = 32


def _shape(kind: str, radius: float, cx: float, cy: float) -> torch.Tensor:
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    rr, theta = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2), torch.atan2(y - cy, x - cx)
    limit = radius * (1 + 0.4 * torch.cos(7 * theta)) if kind == "star" else radius
    return (rr <= limit).float()


def toy_batch(n_benign: int = 3, n_malignant: int = 3, n_normal: int = 2, seed: int = 0) -> dict:
    """Discs (benign) and stars (malignant), dark on speckled grey, plus empty normals."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for i in range(n_benign + n_malignant):
        kind = "disc" if i < n_benign else "star"
        r = 6 + 3 * torch.rand(1, generator=gen).item()
        cx, cy = (12 + 8 * torch.rand(2, generator=gen)).tolist()
        masks.append(_shape(kind, r, cx, cy))
    masks += [torch.zeros(SIZE, SIZE)] * n_normal
    mask = torch.stack(masks)[:, None]
    raw = (0.6 + 0.05 * torch.randn(mask.shape, generator=gen) - 0.35 * mask).clamp(0, 1)
    image = (raw - raw.mean((2, 3), keepdim=True)) / raw.std((2, 3), keepdim=True)
    n = mask.shape[0]
    return {
        "image": image,
        "raw": raw,
        "mask": mask,
        "malignant": torch.tensor([0.0] * n_benign + [1.0] * n_malignant + [0.0] * n_normal),
        "has_lesion": mask.flatten(1).amax(1) > 0,
        "spacing_mm": torch.full((n,), float("nan")),
    }


def outputs(batch: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = batch["mask"].shape[0]
    mask_logits = (2.0 * torch.randn(n, 1, SIZE, SIZE, generator=gen)).requires_grad_(True)
    cls_logit = torch.randn(n, generator=gen).requires_grad_(True)
    return mask_logits, cls_logit


def cfg(**kw) -> LossConfig:
    return replace(LossConfig(), **kw)


ARMS = {
    "single_task": dict(cls_weight=0.0, consistency=0.0),
    "multi_task": dict(consistency=0.0),
    "proposed": dict(),
    "focal": dict(cls_loss="focal"),
    "all_features_sup": dict(features=("area", "roughness", "compactness", "texture",
                                       "orientation", "margin_sharpness", "posterior"),
                             prior_supervision=0.1),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_arm_reports_all_parts_and_backprops(arm: str) -> None:
    c = cfg(**ARMS[arm])
    batch = toy_batch()
    ml, cl = outputs(batch)
    prior = BiradsPrior(c.features)
    total, parts = MultiTaskLoss(c)(ml, cl, batch, prior)
    assert set(parts) == set(PART_KEYS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in parts.values())
    assert parts["total"] == pytest.approx(total.item())
    total.backward()
    assert torch.isfinite(ml.grad).all()
    assert (cl.grad is None) == (c.cls_weight == 0)


def test_total_is_the_weighted_sum_and_lambda_zero_adds_nothing() -> None:
    batch = toy_batch()
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES).eval()
    plain = MultiTaskLoss(cfg(consistency=0.0, seg_weight=0.7, cls_weight=1.3))
    _, p0 = plain(ml, cl, batch, prior)
    assert p0["consistency"] > 0  # still reported
    assert p0["total"] == pytest.approx(0.7 * p0["seg"] + 1.3 * p0["cls"], rel=1e-6)
    proposed = MultiTaskLoss(cfg(consistency=0.5, seg_weight=0.7, cls_weight=1.3))
    _, p1 = proposed(ml, cl, batch, prior)
    assert p1["total"] == pytest.approx(p0["total"] + 0.5 * p1["consistency"], rel=1e-6)
    assert p1["seg"] == pytest.approx(p1["dice"] + p1["bce"], rel=1e-6)
    # single-task arm: classification and consistency both off
    _, p2 = MultiTaskLoss(cfg(cls_weight=0.0, consistency=0.5))(ml, cl, batch, prior)
    assert p2["total"] == pytest.approx(p2["seg"], rel=1e-6)


def test_consistency_value_is_mse_over_lesion_images() -> None:
    batch = toy_batch(2, 2, 2)
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES).eval()
    _, parts = MultiTaskLoss(cfg())(ml, cl, batch, prior)
    from common.birads import birads_features

    phi = prior(birads_features(torch.sigmoid(ml), batch["raw"], None, PAPER_FEATURES))
    lesion = batch["has_lesion"]
    expected = ((torch.sigmoid(cl) - phi)[lesion] ** 2).mean()
    assert parts["consistency"] == pytest.approx(expected.item(), rel=1e-5)


def test_dice_ignores_normal_images_but_bce_does_not() -> None:
    batch = toy_batch(1, 0, 1)
    ml = (40.0 * batch["mask"] - 20.0).clone()  # perfect on the lesion image...
    ml[1] = 20.0  # ...and "lesion everywhere" on the normal image
    cl = torch.zeros(2)
    _, parts = MultiTaskLoss(cfg())(ml, cl, batch, BiradsPrior(PAPER_FEATURES))
    assert parts["dice"] < 1e-3
    assert parts["bce"] == pytest.approx(0.5 * 20.0, rel=1e-3)  # half the pixels cost ~20 nats
    dl = soft_dice_loss(ml, batch["mask"])
    assert dl[0] < 1e-3 and dl[1] > 0.99


def test_classification_losses_by_hand() -> None:
    z, one = torch.zeros(1), torch.ones(1)
    assert focal_loss(z, one, 0.25, 2.0).item() == pytest.approx(0.25 * 0.25 * math.log(2))
    assert focal_loss(z, z, 0.25, 2.0).item() == pytest.approx(0.75 * 0.25 * math.log(2))
    loss = MultiTaskLoss(cfg(), pos_weight=3.0)
    assert loss._cls(z, one).item() == pytest.approx(3 * math.log(2))
    assert loss._cls(z, z).item() == pytest.approx(math.log(2))
    assert MultiTaskLoss(cfg(pos_weight=2.0)).pos_weight == 2.0
    assert MultiTaskLoss(cfg(pos_weight=2.0), pos_weight=5.0).pos_weight == 5.0


def _grads(mode: str, lam: float) -> tuple:
    batch = toy_batch()
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES)
    c = cfg(consistency=lam, consistency_grad=mode, seg_weight=0.0)
    total, _ = MultiTaskLoss(c)(ml, cl, batch, prior)
    total.backward()
    return ml.grad, cl.grad, prior.head.raw_weight.grad


def test_consistency_grad_modes_route_gradients() -> None:
    _, cl_ref, _ = _grads("both", 0.0)
    # classifier: features detached ⇒ nothing reaches the mask, but the prior's weights learn
    ml, cl, pw = _grads("classifier", 0.5)
    assert ml is None and pw is not None and pw.abs().sum() > 0
    assert not torch.allclose(cl, cl_ref)
    # mask: p̂ detached ⇒ classifier gradient is the classification loss alone
    ml, cl, pw = _grads("mask", 0.5)
    assert torch.allclose(cl, cl_ref)
    assert ml is not None and ml.abs().sum() > 0 and pw.abs().sum() > 0
    # both
    ml, cl, pw = _grads("both", 0.5)
    assert not torch.allclose(cl, cl_ref)
    assert ml.abs().sum() > 0 and pw.abs().sum() > 0
    # normal images get no consistency gradient into their masks
    assert ml[-2:].abs().sum() == 0


def test_prior_supervision_trains_only_the_prior() -> None:
    batch = toy_batch()
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES)
    loss = MultiTaskLoss(cfg(seg_weight=0.0, cls_weight=0.0, prior_supervision=1.0))
    assert loss.trains_prior()
    total, parts = loss(ml, cl, batch, prior)
    total.backward()
    assert ml.grad is None and cl.grad is None
    assert prior.head.raw_weight.grad.abs().sum() > 0 and parts["prior_sup"] > 0
    assert not MultiTaskLoss(cfg(consistency=0.0)).trains_prior()
    assert MultiTaskLoss(cfg(consistency_grad="classifier")).trains_prior()
    assert not MultiTaskLoss(cfg(cls_weight=0.0)).trains_prior()  # single-task: no λ, no prior


@pytest.mark.parametrize("mode", ["both", "mask", "classifier"])
def test_single_image_without_lesion_is_finite(mode: str) -> None:
    batch = toy_batch(0, 0, 1)
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES)
    total, parts = MultiTaskLoss(cfg(consistency_grad=mode, prior_supervision=0.1))(
        ml, cl, batch, prior
    )
    total.backward()
    assert math.isfinite(total.item()) and all(math.isfinite(v) for v in parts.values())
    assert parts["dice"] == 0.0 and parts["consistency"] == 0.0
    assert torch.isfinite(ml.grad).all() and torch.isfinite(cl.grad).all()
    assert prior.num_updates.item() == 0  # no lesion, no statistics


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="consistency_grad"):
        MultiTaskLoss(cfg(consistency_grad="prior"))
    with pytest.raises(ValueError, match="cls_loss"):
        MultiTaskLoss(cfg(cls_loss="hinge"))
    with pytest.raises(ValueError, match="features"):
        MultiTaskLoss(cfg(features=("area", "spiculation")))


class TinyNet(nn.Module):
    """Three GroupNorm convs → mask logits; pooled features → malignancy logit."""

    def __init__(self, features: tuple[str, ...]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.GroupNorm(2, 8), nn.ReLU(),
        )
        self.seg = nn.Conv2d(8, 1, 1)
        self.cls = nn.Linear(8, 1)
        self.prior = BiradsPrior(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.seg(h), self.cls(h.mean((2, 3)))[:, 0]


def test_loss_decreases_on_a_toy_batch() -> None:
    torch.manual_seed(0)
    batch = toy_batch(4, 4, 1)
    model = TinyNet(PAPER_FEATURES)
    loss_fn = MultiTaskLoss(cfg(prior_supervision=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        opt.zero_grad()
        total, parts = loss_fn(*model(batch["image"]), batch, model.prior)
        total.backward()
        opt.step()
        history.append(parts)
    assert history[-1]["total"] < 0.7 * history[0]["total"]
    assert history[-1]["seg"] < 0.5 * history[0]["seg"]
    assert all(math.isfinite(h["total"]) for h in history)
    assert all(v > 0 for v in model.prior.weights().values())  # paper features: all clinical +


def test_runs_under_autocast_with_prior_supervision() -> None:
    batch = toy_batch(2, 2, 1)
    model = TinyNet(PAPER_FEATURES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_logits, cls_logit = model(batch["image"])
        total, parts = MultiTaskLoss(cfg(prior_supervision=0.1))(
            mask_logits, cls_logit, batch, model.prior
        )
    total.backward()
    assert total.dtype == torch.float32 and all(math.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_per_sample_denominator_decouples_images() -> None:
    """Under DP each image's loss gradient must not depend on which other images share the batch."""
    import torch

    from common.birads import BiradsPrior
    from common.config import LossConfig
    from common.losses import MultiTaskLoss

    torch.manual_seed(0)
    cfg = LossConfig()
    prior = BiradsPrior(cfg.features)
    loss_fn = MultiTaskLoss(cfg, pos_weight=1.0, per_sample_denominator=True)
    mask = torch.zeros(3, 1, 16, 16)
    mask[0, :, 4:10, 4:10] = 1
    mask[1, :, 6:12, 3:9] = 1  # image 2 is normal
    raw = torch.rand(3, 1, 16, 16)

    def grad_of_first(has_lesion_of_others: list[bool]) -> torch.Tensor:
        logits = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        batch = {"image": raw, "raw": raw, "mask": mask,
                 "malignant": torch.tensor([1.0, 0.0, 0.0]),
                 "has_lesion": torch.tensor([True, *has_lesion_of_others]),
                 "spacing_mm": torch.full((3,), float("nan"))}
        prior.eval()
        total, _ = loss_fn(logits, torch.zeros(3, requires_grad=True), batch, prior)
        total.backward()
        return logits.grad[0]

    assert torch.allclose(grad_of_first([True, False]), grad_of_first([False, False]), atol=1e-7)
    coupled = MultiTaskLoss(cfg, pos_weight=1.0)  # default: lesion-count denominator couples images
    loss_fn = coupled
    assert not torch.allclose(grad_of_first([True, False]), grad_of_first([False, False]), atol=1e-7)


def test_consistency_warmup_then_ramp_in_run_epochs() -> None:
    """Warm-up 1 epoch, ramp 2: a step ending at run progress p applies λ·clamp((p − 1)/2, 0, 1);
    without ``progress`` (evaluation) λ itself."""
    batch, prior = toy_batch(), BiradsPrior(PAPER_FEATURES)
    loss = MultiTaskLoss(cfg(consistency=0.5, consistency_warmup_epochs=1.0, consistency_ramp_epochs=2.0))
    applied = []
    for end in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
        lam = loss.scheduled_consistency(end)
        _, parts = loss(*outputs(batch), batch, prior, progress=end)
        plain = parts["seg"] + parts["cls"]
        assert parts["total"] == pytest.approx(plain + lam * parts["consistency"], rel=1e-5)
        applied.append(lam)
    assert applied == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    _, parts = loss(*outputs(batch), batch, prior)
    assert parts["total"] == pytest.approx(parts["seg"] + parts["cls"] + 0.5 * parts["consistency"], rel=1e-5)
    assert MultiTaskLoss(cfg(consistency=0.5)).scheduled_consistency(0.1) == 0.5  # no schedule
    with pytest.raises(ValueError, match="consistency_ramp_epochs"):
        cfg(consistency_ramp_epochs=-1.0)


def _partial(has_mask: list[bool], has_label: list[bool]) -> dict:
    """toy_batch (3 benign, 3 malignant, 2 normal) with some masks / labels unknown: an unknown
    mask is all 0 and the lesion flag then comes from the label."""
    batch = toy_batch()
    known_mask, known_label = torch.tensor(has_mask), torch.tensor(has_label)
    lesion = torch.tensor([True] * 6 + [False] * 2)
    batch["mask"] = batch["mask"] * known_mask[:, None, None, None]
    return {**batch, "has_mask": known_mask, "has_label": known_label, "has_lesion": lesion}


def test_label_only_image_gets_no_segmentation_loss_but_a_consistency_gradient() -> None:
    full = [True] * 8
    only_first_unmasked = [False] + [True] * 7
    ml, cl = outputs(toy_batch())
    ref = _partial(full, full)
    part = _partial(only_first_unmasked, full)
    loss = MultiTaskLoss(cfg(consistency_grad="both"))
    prior = BiradsPrior(PAPER_FEATURES)
    _, p_ref = loss(ml, cl, ref, prior)
    total, p_part = loss(ml, cl, part, prior)
    total.backward()
    # its mask logits reach the loss only through the consistency term
    assert ml.grad[0].abs().sum() > 0
    # segmentation terms: exactly the other images' (BCE per-image mean over 7, Dice over 5)
    bce_img = torch.nn.functional.binary_cross_entropy_with_logits(
        ml.detach(), ref["mask"], reduction="none").flatten(1).mean(1)
    assert p_part["bce"] == pytest.approx(float(bce_img[1:].mean()), rel=1e-5)
    assert p_part["dice"] == pytest.approx(float(soft_dice_loss(ml.detach(), ref["mask"])[1:6].mean()),
                                           rel=1e-5)
    assert p_part["cls"] == pytest.approx(p_ref["cls"], rel=1e-6)
    # with only segmentation on, the label-only image gets no gradient at all
    ml2 = ml.detach().clone().requires_grad_(True)
    seg_only = MultiTaskLoss(cfg(cls_weight=0.0))
    seg_only(ml2, cl, part, prior)[0].backward()
    assert ml2.grad[0].abs().sum() == 0 and ml2.grad[1].abs().sum() > 0


def test_mask_only_image_gets_no_classification_loss() -> None:
    full = [True] * 8
    ml, cl = outputs(toy_batch())
    part = _partial(full, [False] + [True] * 7)
    loss = MultiTaskLoss(cfg(consistency=0.0, seg_weight=0.0))
    total, parts = loss(ml, cl, part, BiradsPrior(PAPER_FEATURES))
    total.backward()
    assert cl.grad[0] == 0 and cl.grad[1:].abs().sum() > 0
    expect = torch.nn.functional.binary_cross_entropy_with_logits(cl.detach()[1:], part["malignant"][1:])
    assert parts["cls"] == pytest.approx(float(expect), rel=1e-5)


def test_classifier_mode_gives_the_mask_no_consistency_gradient() -> None:
    batch = toy_batch()
    ml, cl = outputs(batch)
    prior = BiradsPrior(PAPER_FEATURES)
    total, parts = MultiTaskLoss(cfg(seg_weight=0.0, consistency_grad="classifier"))(
        ml, cl, batch, prior)
    total.backward()
    assert parts["consistency"] > 0
    assert ml.grad is None or ml.grad.abs().sum() == 0
    assert prior.head.bias.grad.abs().sum() > 0
