"""What takes a clipped per-sample gradient's direction: per-image gradient norms of each loss term.

DP-SGD clips every image's gradient to norm C before noising, so whichever term has the largest
gradient in an image decides that image's clipped direction. This prints, for a model file on a
centre's training images, the per-image gradient norms (over the parameters ``privacy.trainable``
leaves to DP-SGD) of the segmentation term, the classification term and the rest (consistency,
prior supervision), at full λ, split by lesion and normal images, with the share of images whose
total exceeds C. Per-sample denominators, as under DP (``common.losses``).

    python -m sim.dp_grad_norms MODEL.pt --data-root DATA --centre BUS-UCLM [--images 48]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from common.config import LossConfig
from common.data.tensors import TensorData, batches
from common.dp_trainable import frozen_for_dp
from common.losses import MultiTaskLoss

TERMS = ("total", "seg", "cls", "rest")


def _norm(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))


def term_grad_norms(model: nn.Module, data: TensorData, loss_cfg: LossConfig, trainable: str = "norms",
                    images: int = 48, seed: int = 0) -> pd.DataFrame:
    """Rows (image, lesion, term, norm) for ``images`` images drawn from ``data``: the gradient
    norm of each weighted term (``TERMS``; rest = total − seg − cls) over the parameters DP-SGD
    trains under ``trainable``, in training mode, prior statistics frozen as under DP (both
    restored after)."""
    was_training = model.training
    model.train()
    leave_out = {id(p) for _, p in frozen_for_dp(model, trainable)}
    params = [p for p in model.parameters() if id(p) not in leave_out]
    prior = model.prior
    tracking, prior.track_running_stats = prior.track_running_stats, False
    R = dataclasses.replace
    fns = {"total": MultiTaskLoss(loss_cfg, per_sample_denominator=True),
           "seg": MultiTaskLoss(R(loss_cfg, cls_weight=0.0, prior_supervision=0.0), per_sample_denominator=True),
           "cls": MultiTaskLoss(R(loss_cfg, seg_weight=0.0, consistency=0.0, prior_supervision=0.0),
                                per_sample_denominator=True)}
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images]
    with torch.random.fork_rng():  # dropout draws the same masks in every call
        torch.manual_seed(seed)
        try:
            return pd.DataFrame(_rows(model, data, pick.tolist(), params, fns))
        finally:
            prior.track_running_stats = tracking
            model.train(was_training)


def _rows(model: nn.Module, data: TensorData, pick: list[int], params: list[nn.Parameter],
          fns: dict[str, MultiTaskLoss]) -> list[dict]:
    rows = []
    for i, b in zip(pick, batches(data.subset(pick), 1, shuffle=False)):
        mask_logits, cls_logit = model(b["image"])
        grads = {k: torch.autograd.grad(fn(mask_logits, cls_logit, b, model.prior)[0], params,
                                        allow_unused=True, retain_graph=True)
                 for k, fn in fns.items()}
        rest = [None if t is None else t - (s if s is not None else 0) - (c if c is not None else 0)
                for t, s, c in zip(grads["total"], grads["seg"], grads["cls"])]
        lesion = bool(b["has_lesion"][0])
        for term, g in (*grads.items(), ("rest", rest)):
            rows.append({"image": i, "lesion": lesion, "term": term, "norm": float(_norm(g))})
    return rows


def summarise(rows: pd.DataFrame, clip: float) -> pd.DataFrame:
    """Per (lesion, term): n, median, q10, q90 of the norms; for the total, the share above C."""
    out = rows.groupby(["lesion", "term"])["norm"].describe(percentiles=[0.1, 0.5, 0.9])
    out = out.rename(columns={"10%": "q10", "50%": "median", "90%": "q90"})[["count", "median", "q10", "q90"]]
    clipped = rows[rows.term == "total"].groupby("lesion")["norm"].apply(lambda v: float((v > clip).mean()))
    out["clipped"] = [clipped[lesion] if term == "total" else float("nan") for lesion, term in out.index]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.dp_grad_norms", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model file (common.modelfile)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--centre", required=True)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--trainable", default="norms", help="all | decoder | norms (privacy.trainable)")
    ap.add_argument("--clip", type=float, default=1.0, help="C, privacy.max_grad_norm")
    ap.add_argument("--cls-weight", type=float, default=None, help="override loss.cls_weight")
    args = ap.parse_args(argv)
    if args.images < 1 or not args.clip > 0:
        ap.error(f"--images must be >= 1 and --clip > 0, got {args.images} and {args.clip}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from common.loaded_model import load_model
    from common.modelfile import ModelFileError
    from common.sitedata import load_site_tensors
    from sim.score_model import centre_sites

    try:
        member = load_model(args.model).members[0]
        site = centre_sites(args.data_root, [args.centre])[args.centre]
        train, _ = load_site_tensors(site, member.config.data)
        loss_cfg = member.config.loss
        if args.cls_weight is not None:
            loss_cfg = dataclasses.replace(loss_cfg, cls_weight=args.cls_weight)
        rows = term_grad_norms(member.network(), train, loss_cfg, args.trainable, args.images)
    except (ModelFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.centre}: per-image gradient norms over '{args.trainable}' parameters (C = {args.clip:g})")
    print(summarise(rows, args.clip).to_string(float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
