"""How one DP-SGD step's per-sample gradients are formed: augmentation multiplicity, virtual
steps and the Opacus module check (used by ``common.privacy.PrivacySession``).

- **Augmentation multiplicity** (De et al. 2022, "Unlocking high-accuracy differentially
  private image classification through scale"): every image of a Poisson batch is repeated K
  times (rows i·K … i·K+K−1 are its copies, each augmented independently by
  ``common.train``); before Opacus clips, each image's per-sample gradient becomes the mean of
  its K rows. The sensitivity is still one clipped gradient per image, so the accounting is
  unchanged; the average only lowers the variance of the signal.
- **Virtual steps**: a Poisson batch larger than the physical bound is cut into chunks; each
  chunk's per-sample gradients are clipped and summed into Opacus' ``summed_grad``
  (``DPOptimizer.signal_skip_step``, the mechanism of ``opacus.utils.BatchMemoryManager``) and
  only the last chunk adds the noise and updates: one logical step, one accounted step, the
  same update as one pass over the whole batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def refuse_unsupported_modules(model: nn.Module, site: str) -> None:
    """ValueError naming every module Opacus cannot privatise (e.g. BatchNorm: it normalises one
    image by its batch peers, so its gradient depends on them); raised before training."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        named = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        hint = (f" ({len(named)} BatchNorm layer(s): use GroupNorm, e.g. model.encoder_norm: group | affine)"
                if named else "")
        reasons = "; ".join(sorted({str(e).split(". ")[0] for e in errors}))
        raise ValueError(f"site {site}: DP-SGD refused before training: the model has modules "
                         f"Opacus cannot privatise{hint}: {reasons}")


def mean_over_copies(grad_sample: Tensor, k: int) -> Tensor:
    """(B·K, *shape) per-row gradients → (B, *shape): each image's mean over its K copies."""
    rows = grad_sample.shape[0]
    if rows % k:
        raise RuntimeError(f"augmult: {rows} per-sample gradients are not a multiple of K={k}")
    return grad_sample.reshape(rows // k, k, *grad_sample.shape[1:]).mean(dim=1)


def average_copies_before_clipping(optimizer: Any, k: int) -> None:
    """Make ``optimizer`` (an Opacus DPOptimizer) replace every ``p.grad_sample`` by
    ``mean_over_copies(·, k)`` right before it clips (its ``clip_and_accumulate``)."""
    clip = optimizer.clip_and_accumulate

    def clip_averaged() -> None:
        for p in optimizer.params:
            gs = p.grad_sample
            if isinstance(gs, list):  # several backward passes without zero_grad
                gs = torch.cat(gs, dim=0)
            if gs is not None and gs.shape[0]:
                p.grad_sample = mean_over_copies(gs, k)
        clip()

    optimizer.clip_and_accumulate = clip_averaged


def split_indices(idx: Tensor, max_images: int | None) -> list[Tensor]:
    """The Poisson draw ``idx`` as chunks of at most ``max_images`` (None: one chunk), sizes
    as equal as possible (``np.array_split``, as Opacus' ``BatchSplittingSampler``)."""
    if max_images is None or len(idx) <= max_images:
        return [idx]
    parts = -(-len(idx) // max_images)
    return list(torch.tensor_split(idx, parts))


def repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """Each image of a batch dict K times in a row (every tensor with the batch's first dim)."""
    if k == 1:
        return batch
    n = int(batch["mask"].shape[0])
    return {key: v.repeat_interleave(k, dim=0) if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v
            for key, v in batch.items()}
