"""Multi-task loss: segmentation + malignancy classification + BI-RADS consistency MSE(p̂, φ).

total = seg_weight·(dice·Dice + bce·BCE) + cls_weight·cls + λ·MSE(p̂, φ)
        + prior_supervision·BCE(φ, y)

Choices that the published method leaves open, made here:
- Dice is per image over *lesion images only* (the Dice of an empty truth is degenerate: any
  prediction scores 0 or 1 by convention); BCE covers every pixel of every image, so normal
  images still teach "no lesion". The Dice term is 0 for a batch without lesions.
- Partial annotations (``has_mask``, ``has_label`` per image; absent = known): the segmentation
  terms use images with a mask only (pixel BCE: a per-image mean over those images; Dice: their
  lesion images), the classification term images with a label only, and the consistency term
  every *lesion image*: ``has_lesion``, which is the mask's answer where the mask is known (non-
  empty = lesion, whatever the label) and the label's where it is not (benign or malignant =
  lesion, normal = none; ``common.data.tensors.lesion_present``). A label-only lesion image is
  where the term earns its place: its p̂ is trained by the label, and the consistency term is the
  only one that reaches its predicted mask. Prior supervision needs both a lesion and a label.
  φ is still evaluated for every image (and multiplied by 0), so the graph and Opacus'
  per-sample hooks look the same whatever the batch holds.
- The prior learns in every mode. ``consistency_grad`` routes the term's gradient to the mask
  (``mask``), to p̂ (``classifier``) or to both, but the prior's own weights and bias always
  receive the term's gradient (in ``classifier`` mode φ is computed from features that carry no
  gradient, so the mask is untouched). We chose this over making the label term
  BCE(φ, y) (``prior_supervision``) the way the prior learns: the consistency gradient exists in
  every arm that uses the term, needs no label (so label-less images teach the prior too) and
  no extra weight to tune, and makes φ the best sign-constrained, interpretable summary of what
  the classifier has learned from shape; its weights are then "what this model learned about
  malignancy". ``prior_supervision`` stays available as an anchor to the labels.
- ``cls_weight = 0`` is the single-task segmentation arm: p̂ is untrained there, so the
  consistency term is switched off too (its value is still reported).
- Prior supervision trains the prior's weights only: it sees detached features, so it cannot push
  the predicted masks towards "malignant-looking" shapes.
- Terms whose weight is 0 are computed without gradient, for the report only.
- λ warm-up (``consistency_warmup_epochs``, ``consistency_ramp_epochs``): a training step that
  ends at run progress p in global epochs (``progress=``, from ``train_local``) applies 0 until p
  passes the warm-up, then λ·min(1, (p − warm-up)/ramp), so the consistency term only starts once
  the masks and p̂ mean something. Progress counts the whole run (``common.schedule``), so the
  warm-up happens once, not in every federated round; a call without ``progress`` applies λ.

Per-sample structure (for DP-SGD): every term is a mean of per-image terms. By default each term
divides by the batch's count of the images it covers (lesion, masked, labelled), which couples
images; with
``per_sample_denominator=True`` (set by ``train_local`` under DP) they divide by the batch size, so
after Opacus undoes its mean reduction each image's gradient depends on that image alone.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.birads import FEATURE_NAMES, BiradsPrior, birads_features
from common.config import LossConfig
from common.schedule import ramp

if TYPE_CHECKING:
    from common.data.tensors import TensorData

log = logging.getLogger(__name__)

PART_KEYS: tuple[str, ...] = ("seg", "dice", "bce", "cls", "consistency", "prior_sup", "total")
_SMOOTH = 1.0  # pixels; Dice smoothing


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image soft Dice loss 1 − (2|P∩T| + s)/(|P| + |T| + s), (B,) from (B,1,S,S)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2.0 * inter + _SMOOTH) / (p.sum(1) + t.sum(1) + _SMOOTH)


def focal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-sample α-balanced focal loss (Lin et al. 2017), (B,); α weights the positives."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (1 - p_t).clamp_min(1e-6) ** gamma * ce


class MultiTaskLoss(nn.Module):
    """See the module docstring. ``pos_weight`` (positives' BCE weight, usually n_benign/n_malignant
    from the training labels) overrides ``cfg.pos_weight``; with neither the BCE is unweighted."""

    def __init__(
        self, cfg: LossConfig, pos_weight: float | None = None, per_sample_denominator: bool = False
    ) -> None:
        super().__init__()
        self.per_sample_denominator = per_sample_denominator
        if cfg.cls_loss not in ("bce", "focal"):
            raise ValueError(f"loss.cls_loss must be 'bce' or 'focal', got {cfg.cls_loss!r}")
        if cfg.consistency_grad not in ("both", "mask", "classifier"):
            raise ValueError(
                f"loss.consistency_grad must be 'both', 'mask' or 'classifier', "
                f"got {cfg.consistency_grad!r}"
            )
        unknown = [n for n in cfg.features if n not in FEATURE_NAMES]
        if unknown or not cfg.features:
            raise ValueError(f"loss.features: unknown or empty {list(cfg.features)}; "
                             f"known: {list(FEATURE_NAMES)}")
        for name in ("seg_weight", "dice", "bce", "cls_weight", "consistency", "prior_supervision",
                     "consistency_warmup_epochs", "consistency_ramp_epochs"):
            if not getattr(cfg, name) >= 0:  # NaN fails too
                raise ValueError(f"loss.{name} must be ≥ 0, got {getattr(cfg, name)}")
        self.cfg = cfg
        pw = pos_weight if pos_weight is not None else cfg.pos_weight
        if pw is not None and not pw > 0:
            raise ValueError(f"pos_weight must be > 0, got {pw}")
        self.pos_weight = None if pw is None else float(pw)

    @property
    def consistency_weight(self) -> float:
        """λ actually applied (0 in the single-task arm)."""
        return self.cfg.consistency if self.cfg.cls_weight > 0 else 0.0

    def scheduled_consistency(self, end: float) -> float:
        """λ for a training step that ends at run progress ``end`` (global epochs): 0 until the
        warm-up has passed, then linear to λ over the ramp."""
        if self.cfg.consistency_warmup_epochs == 0 and self.cfg.consistency_ramp_epochs == 0:
            return self.consistency_weight
        return self.consistency_weight * ramp(end, self.cfg.consistency_warmup_epochs,
                                              self.cfg.consistency_ramp_epochs)

    def trains_prior(self) -> bool:
        """Whether the prior's parameters receive gradient. Where False, freeze them (e.g. under
        Opacus, which requires a per-sample gradient for every trainable parameter)."""
        return self.consistency_weight > 0 or self.cfg.prior_supervision > 0

    def _cls(self, logit: Tensor, target: Tensor) -> Tensor:
        """Per-image classification loss (B,)."""
        if self.cfg.cls_loss == "focal":
            return focal_loss(logit, target, self.cfg.focal_alpha, self.cfg.focal_gamma)
        pw = None if self.pos_weight is None else logit.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logit, target, pos_weight=pw, reduction="none")

    def forward(
        self,
        mask_logits: Tensor,
        cls_logit: Tensor,
        batch: Mapping[str, Tensor],
        prior: BiradsPrior,
        progress: float | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """mask_logits (B,1,S,S), cls_logit (B,) → (total, parts); ``batch`` as from
        ``common.data.tensors.batches`` (needs mask, malignant, has_lesion, raw). Parts are the
        unweighted terms (``dice`` is the Dice *loss*, 1 − Dice) and the weighted ``total``.
        ``progress``: run progress in global epochs at the end of this training step (λ's
        schedule); None: λ unscheduled (evaluation, or a caller without a run)."""
        cfg = self.cfg
        mask_logits = mask_logits.float()  # Dice sums and features in float32, even under autocast
        cls_logit = cls_logit.float()
        target = batch["mask"].to(mask_logits.dtype)
        if target.shape != mask_logits.shape:
            raise ValueError(f"mask {tuple(target.shape)} vs logits {tuple(mask_logits.shape)}")
        cls_logit = cls_logit.reshape(-1)
        y = batch["malignant"].to(cls_logit.dtype).reshape(-1)
        lesion = batch["has_lesion"].to(torch.bool).reshape(-1)
        known_mask = batch.get("has_mask", torch.ones_like(lesion)).to(torch.bool).reshape(-1)
        known_label = batch.get("has_label", torch.ones_like(lesion)).to(torch.bool).reshape(-1)
        w = lesion.to(mask_logits.dtype)
        w_mask = known_mask.to(mask_logits.dtype)
        w_dice = (lesion & known_mask).to(mask_logits.dtype)
        w_label = known_label.to(mask_logits.dtype)
        w_sup = (lesion & known_label).to(mask_logits.dtype)

        def mean_over(values: Tensor, weights: Tensor) -> Tensor:
            """Σ values·weights / (their count, or the batch size under per-sample denominators)."""
            den = (weights.new_tensor(float(weights.numel())) if self.per_sample_denominator
                   else weights.sum().clamp_min(1.0))
            return (values * weights).sum() / den

        bce_img = F.binary_cross_entropy_with_logits(mask_logits, target, reduction="none").flatten(1)
        bce = mean_over(bce_img.mean(1), w_mask)
        dice = mean_over(soft_dice_loss(mask_logits, target), w_dice)
        seg = cfg.dice * dice + cfg.bce * bce
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.cls_weight > 0):
            cls = mean_over(self._cls(cls_logit, y), w_label)

        lam = self.consistency_weight if progress is None else self.scheduled_consistency(progress)
        mode = cfg.consistency_grad
        p_hat = torch.sigmoid(cls_logit)
        # features need grad only when φ's gradient reaches the mask (mode both/mask and λ > 0);
        # the prior's own parameters get the term's gradient in every mode
        feat_grad = torch.is_grad_enabled() and lam > 0 and mode != "classifier"
        with torch.set_grad_enabled(feat_grad):
            feats = birads_features(
                torch.sigmoid(mask_logits), batch.get("raw"), batch.get("spacing_mm"),
                cfg.features,
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and lam > 0):
            phi = prior(feats, track=lesion)
        if mode == "mask":
            p_hat = p_hat.detach()
        consistency = mean_over((p_hat - phi) ** 2, w)

        if cfg.prior_supervision > 0 and torch.is_grad_enabled():
            phi_logit = prior.logit(feats.detach(), track=False)
        else:
            phi_logit = torch.logit(phi.detach().float(), eps=1e-6)
        prior_sup = mean_over(F.binary_cross_entropy_with_logits(phi_logit, y, reduction="none"), w_sup)

        total = mask_logits.new_zeros(())  # only terms with a positive weight enter the graph
        if cfg.seg_weight > 0:
            total = total + cfg.seg_weight * seg
        if cfg.cls_weight > 0:
            total = total + cfg.cls_weight * cls
        if lam > 0:
            total = total + lam * consistency
        if cfg.prior_supervision > 0:
            total = total + cfg.prior_supervision * prior_sup
        values = torch.stack([seg, dice, bce, cls, consistency, prior_sup, total]).detach()
        parts = dict(zip(PART_KEYS, (float(v) for v in values.cpu().tolist())))
        return total, parts


def trained_parts(train: "TensorData", loss: LossConfig) -> dict[str, int]:
    """The weights of a site's mask decoder and classifier head in the federation's mean: the
    lesion images that teach the decoder a lesion (a lesion mask, or the consistency term routed
    into the mask) and the images that give the head a gradient (a label, or the term routed into
    the classifier). Normal images still train the decoder at the site but buy it no weight: the
    Dice term that shapes the masks is a mean over lesion images, so a site's share of the
    federation's lesions is its share of the masks, as in pooled training."""
    lesion = train.has_lesion & (train.has_mask | train.has_label)
    routed = loss.consistency > 0 and loss.cls_weight > 0
    lesion_masks = train.has_mask & train.has_lesion
    decoder = lesion_masks | (lesion if routed and loss.consistency_grad in ("mask", "both") else False)
    head = train.has_label | (lesion if routed and loss.consistency_grad in ("classifier", "both") else False)
    return {"n_decoder": int(decoder.sum()), "n_head": int(head.sum())}
