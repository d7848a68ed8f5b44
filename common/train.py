"""The one local-training function, shared by centralised, simulated and deployed training.

``train_local`` runs ``train_cfg.epochs`` epochs of the multi-task loss on one site's data and
returns a ``TrainResult``. FedProx adds (μ/2)·Σ‖w − w_global‖² over the trainable parameters;
it is applied as its exact gradient μ·(w − w_global), added after back-propagation, so that a
DP optimiser (which replaces gradients by noised per-sample ones) can still add it after the
noise: the proximal term does not touch the data and costs no privacy.

Privacy seam (``privacy=``): an object with
``wrap(model, optimizer, data, *, batch_size, generator, extra_grad) -> (module, optimizer,
batch_iter_factory)`` and ``after_step()``. ``module`` is what the forward pass calls (e.g. an
Opacus GradSampleModule around ``model``, sharing its parameters, so ``model.state_dict()`` keeps
plain keys); ``batch_iter_factory()`` yields one epoch of batch dicts like
``common.data.tensors.batches`` (e.g. Poisson-sampled), or for one step a list of batch dicts
(the chunks of a batch too large for one pass: after each but the last, ``accumulate()`` is
called instead of ``optimizer.step()``); ``fill_unused(rows)`` is called after each pass's
backward (zero per-sample gradients where the pass reached no parameter); ``extra_grad`` (a
no-argument callable or None) must be called once per step after the noise is added and before
the parameter update.
Without a session, gradient-norm clipping uses ``train_cfg.grad_clip``; with one, the session
clips per sample and ``grad_clip`` is not applied. Optional session attributes: ``trainable``
(all | decoder | norms, ``common.dp_trainable``: what it leaves out is frozen before ``wrap``,
so neither the optimiser nor Opacus sees it) and ``augmult`` (K: each image enters the step K times, each
copy augmented on its own; the session averages their per-sample gradients before clipping).
Under a session, options that couple the images of a batch or break per-sample gradients
(``common.config.dp_refusal``: MixStyle, channels-last, depth splicing) are refused before training.

Schedules (``position=``, a ``common.schedule.RunPosition``): the learning rate and λ are
functions of the run's global epoch progress, so R calls of E epochs placed with
``RunPosition.for_round`` take the same learning rates and λ, step by step, as one call of R·E
epochs (federated rounds and centralised training mean the same recipe).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.config import AugmentConfig, LossConfig, TrainConfig, dp_refusal
from common.data.augment import augment_batch, augmentation
from common.data.tensors import TensorData, batches, lesion_present, normalise
from common.device import resolve_device, seed_everything, set_threads
from common.dp_batches import repeat_rows
from common.dp_trainable import ENCODER_PREFIX, frozen_for_dp
from common.losses import MultiTaskLoss
from common.nets.mixstyle import MixStyle
from common.optim import build_optimizer, proximal
from common.schedule import SCHEDULES, RunPosition, lr_factor

log = logging.getLogger(__name__)

BatchFactory = Callable[[], Iterable[dict[str, Tensor]]]


class PrivacySession(Protocol):
    """What ``train_local`` needs from a DP-SGD implementation (see the module docstring)."""

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TensorData,
        *,
        batch_size: int,
        generator: torch.Generator,
        extra_grad: Callable[[], None] | None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, BatchFactory]: ...

    def after_step(self) -> None: ...

    def accumulate(self) -> None: ...

    def fill_unused(self, rows: int) -> None: ...


@dataclass
class TrainResult:
    """num_examples: images in ``data``; loss/parts: means over the last epoch (parts hold the
    MultiTaskLoss terms plus ``proximal``); history: one dict per epoch."""

    num_examples: int
    epochs: int
    steps: int
    loss: float
    parts: dict[str, float]
    seconds: float
    images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def balanced_pos_weight(malignant: Tensor) -> float:
    """n_negative / n_positive of the labels (1.0 when a class is missing)."""
    pos = float(malignant.sum())
    neg = float(malignant.numel()) - pos
    return neg / pos if pos > 0 and neg > 0 else 1.0


def _prior_record(prior: nn.Module | None) -> dict[str, float]:
    """The prior's learned weights per clinical unit of each feature (``prior_w_<feature>``) and
    its intercept (``prior_bias``), for the epoch's history record ({} without a prior)."""
    if prior is None or not hasattr(prior, "describe"):
        return {}
    d = prior.describe()
    return {**{f"prior_w_{k}": v["per_unit"] for k, v in d["features"].items()},
            "prior_bias": d["bias_per_unit"]}


def _prepare(
    batch: dict[str, Tensor], dev: torch.device, geometry: AugmentConfig | None,
    generator: torch.Generator, augmult: int,
) -> dict[str, Tensor]:
    """A batch dict on ``dev``, each image ``augmult`` times in a row, then augmented (here, not
    in the batch factory: DP batches too; each copy draws its own transform)."""
    batch = {k: v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    batch = repeat_rows(batch, augmult)
    if geometry is None:
        return batch
    raw, mask = augment_batch(batch["raw"], batch["mask"], generator, geometry)
    has_mask = batch.get("has_mask", torch.ones_like(batch["has_lesion"]))
    return {**batch, "raw": raw, "mask": mask, "image": normalise(raw),
            "has_lesion": lesion_present(mask, has_mask, batch["has_lesion"])}


def train_local(
    model: nn.Module,
    data: TensorData,
    train_cfg: TrainConfig,
    loss_cfg: LossConfig,
    *,
    global_state: Mapping[str, Tensor] | None = None,
    proximal_mu: float | None = None,
    privacy: PrivacySession | None = None,
    device: str | torch.device | None = None,
    augment: bool | AugmentConfig | None = True,
    desc: str = "",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    position: RunPosition = RunPosition(),
) -> TrainResult:
    """Train ``model`` (a MultiTaskNet, in place) on ``data``; see the module docstring.

    Deterministic for a given ``train_cfg.seed`` on CPU (data order, augmentation, dropout):
    callers that train repeatedly (federated rounds) should vary the seed per round.
    ``proximal_mu`` None → ``train_cfg.proximal_mu``; the term is active only with μ > 0 and a
    ``global_state`` (state_dict names → tensors). ``on_epoch_end(epoch, record)`` is called
    after each epoch (1-based) with that epoch's history record, e.g. to validate and keep the
    best weights; it may switch the model to eval mode (training mode is restored after it).
    TrainResult.loss is the MultiTaskLoss total; the FedProx term is reported in parts["proximal"].
    ``position``: where this call sits in its run (default: it is the whole run); the LR
    schedule and λ's warm-up count the run's epochs (``common.schedule``).
    """
    if len(data) == 0:
        raise ValueError(f"{desc or 'train_local'}: no training images")
    if train_cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule: unknown {train_cfg.schedule!r} ({' | '.join(SCHEDULES)})")
    total_epochs = position.total(train_cfg.epochs)
    set_threads(train_cfg.num_threads)
    dev = resolve_device(device if device is not None else train_cfg.device)
    generator = seed_everything(train_cfg.seed)
    model.to(dev)
    geometry = augmentation(augment)
    if privacy is not None:
        # Opacus 1.6's conv per-sample gradients are wrong for channels-last tensors (their mean is
        # not the gradient; tests/common/test_privacy.py); the others couple images of a batch.
        mixstyle = max((float(m.p) for m in model.modules() if isinstance(m, MixStyle)), default=0.0)
        refusal = dp_refusal(mixstyle, train_cfg.channels_last, geometry)
        if refusal:
            raise ValueError(f"{desc or 'train_local'}: DP-SGD refused before training: {refusal}")
        if getattr(privacy, "augmult", 1) > 1 and geometry is None:
            log.warning("%s: privacy.augmult=%d without augmentation: the copies are identical",
                        desc or "train_local", privacy.augmult)  # type: ignore[attr-defined]
    model.to(memory_format=torch.channels_last if train_cfg.channels_last else torch.contiguous_format)
    if privacy is not None:
        # Under DP a label-derived weight would be an un-noised statistic of the site's data, and a
        # lesion-count denominator would couple images: use the configured weight (or none) and
        # per-sample denominators.
        pos_weight = loss_cfg.pos_weight
    else:
        pos_weight = (loss_cfg.pos_weight if loss_cfg.pos_weight is not None
                      else balanced_pos_weight(data.malignant[data.has_label]))
    loss_fn = MultiTaskLoss(loss_cfg, pos_weight, per_sample_denominator=privacy is not None)

    prior = getattr(model, "prior", None)
    frozen: list[nn.Parameter] = []
    if prior is not None and not loss_fn.trains_prior():  # no gradient would reach it
        frozen = [p for p in prior.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    trainable = getattr(privacy, "trainable", "all") if privacy is not None else "all"
    if trainable != "all":
        leave_out = frozen_for_dp(model, trainable)
        for _, p in leave_out:  # before wrap: Opacus computes per-sample gradients only where they train
            p.requires_grad_(False)
        frozen += [p for _, p in leave_out]
        if not any(n.startswith(ENCODER_PREFIX) and p.requires_grad for n, p in model.named_parameters()):
            train_cfg = replace(train_cfg, encoder_lr_scale=1.0)  # no encoder group to scale
        log.info("%s: DP-SGD trains %s: %d tensors frozen, %d parameters train", desc or "train_local",
                 trainable, len(leave_out), sum(p.numel() for p in model.parameters() if p.requires_grad))
    try:
        return _run(model, data, train_cfg, loss_fn, global_state, proximal_mu, privacy, dev,
                    geometry, desc, generator, on_epoch_end, position.epoch_offset, total_epochs)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _run(
    model: nn.Module,
    data: TensorData,
    cfg: TrainConfig,
    loss_fn: MultiTaskLoss,
    global_state: Mapping[str, Tensor] | None,
    proximal_mu: float | None,
    privacy: PrivacySession | None,
    dev: torch.device,
    geometry: AugmentConfig | None,
    desc: str,
    generator: torch.Generator,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    epoch_offset: int,
    total_epochs: int,
) -> TrainResult:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, cfg)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]  # the schedule scales these
    mu = cfg.proximal_mu if proximal_mu is None else float(proximal_mu)
    add_prox: Callable[[], None] | None = None
    prox_value: Callable[[], float] = lambda: 0.0  # noqa: E731
    if mu > 0 and global_state is not None:
        missing = [n for n, _ in named if n not in global_state]
        if missing:
            raise KeyError(f"{desc or 'train_local'}: global_state lacks {missing[:5]}")
        pairs = [(p, global_state[n].detach().to(p.device, p.dtype)) for n, p in named]
        add_prox, prox_value = proximal(pairs, mu)

    module: nn.Module = model
    if privacy is not None:
        module, optimizer, epoch_batches = privacy.wrap(
            model, optimizer, data, batch_size=cfg.batch_size, generator=generator, extra_grad=add_prox
        )
    else:
        def epoch_batches() -> Iterable[dict[str, Tensor]]:
            return batches(data, cfg.batch_size, shuffle=True, generator=generator)

    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)  # also Poisson's (DP) steps per epoch
    augmult = int(getattr(privacy, "augmult", 1)) if privacy is not None else 1
    prior = getattr(model, "prior")
    model.train()
    history: list[dict[str, float]] = []
    steps, seen, start = 0, 0, time.perf_counter()
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc=desc or "train", leave=False,
               disable=True if not cfg.progress else None)
    try:
        for epoch in range(cfg.epochs):
            t0, sums, n_epoch = time.perf_counter(), {}, 0
            done = epoch_offset + epoch  # whole epochs of the run before this one
            for i, step in enumerate(epoch_batches()):
                # run progress this step covers, in global epochs (the same float whichever way
                # the run is cut into calls: the schedules must not see the cut)
                at = done + min(i, steps_per_epoch - 1) / steps_per_epoch
                until = done + min(i + 1, steps_per_epoch) / steps_per_epoch
                chunks = step if isinstance(step, list) else [step]  # one step's forward passes
                b = sum(int(c["mask"].shape[0]) for c in chunks)
                if b == 0:  # Poisson sampling can draw an empty batch
                    continue
                factor = lr_factor(cfg, at, until, total_epochs)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                optimizer.zero_grad(set_to_none=True)
                for j, chunk in enumerate(chunks):
                    batch = _prepare(chunk, dev, geometry, generator, augmult)
                    x = batch["image"]
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    mask_logits, cls_logit = module(x)
                    total, parts = loss_fn(mask_logits, cls_logit, batch, prior, progress=until)
                    if not torch.isfinite(total):
                        raise FloatingPointError(f"{desc or 'train_local'}: non-finite loss at epoch "
                                                 f"{epoch + 1} step {steps + 1}: {parts}")
                    total.backward()
                    if privacy is not None:
                        privacy.fill_unused(int(x.shape[0]))
                    if j < len(chunks) - 1:  # clip and sum this chunk; the step comes with the last
                        privacy.accumulate()  # type: ignore[union-attr]
                    share = int(chunk["mask"].shape[0])
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v * share
                if privacy is None:
                    if add_prox is not None:
                        add_prox()
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
                optimizer.step()
                if privacy is not None:
                    privacy.after_step()
                sums["proximal"] = sums.get("proximal", 0.0) + (prox_value() if add_prox is not None else 0.0) * b
                n_epoch += b
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{parts['total']:.3f}")
            seen += n_epoch
            secs = time.perf_counter() - t0
            means = {k: v / max(n_epoch, 1) for k, v in sums.items()}
            history.append({"epoch": epoch + 1, "loss": means.get("total", float("nan")), **means,
                            "seconds": secs, "images_per_s": n_epoch / secs if secs > 0 else 0.0,
                            "lr": optimizer.param_groups[0]["lr"], **_prior_record(prior)})
            log.info("%s epoch %d/%d loss %.4f (seg %.4f cls %.4f cons %.4f prox %.4g) %.1f img/s",
                     desc or "train", epoch + 1, cfg.epochs, means.get("total", float("nan")),
                     means.get("seg", float("nan")), means.get("cls", float("nan")),
                     means.get("consistency", float("nan")), means.get("proximal", 0.0),
                     history[-1]["images_per_s"])
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, dict(history[-1]))
                model.train()
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    last = history[-1] if history else {}
    parts = {k: v for k, v in last.items()
             if k not in ("epoch", "loss", "seconds", "images_per_s", "lr") and not k.startswith("prior_w")
             and k != "prior_bias"}
    return TrainResult(
        num_examples=len(data),
        epochs=cfg.epochs,
        steps=steps,
        loss=float(last.get("loss", float("nan"))),
        parts=parts,
        seconds=seconds,
        images_per_s=seen / seconds if seconds > 0 else 0.0,
        history=history,
    )
