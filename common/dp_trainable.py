"""What DP-SGD trains (``privacy.trainable``), frozen before Opacus wraps the model.

The noise DP-SGD adds has norm σ·C·√d / B for d trainable parameters, while the clipped signal
is at most C: with a few hundred images, a 0.85 M-parameter decoder drowns (external Dice 0 at
ε 8, RESULTS.md §3). Fewer trainable parameters, started from a model that already segments
(``model.init_from``), keep the signal above the noise:

- ``all``: every parameter.
- ``decoder``: all but ``backbone.encoder.*`` (the public ImageNet encoder stays as it is).
- ``norms``: the per-channel scales and shifts only — every GroupNorm / folded-BatchNorm affine
  (encoder included), every bias, the mask's 1×1 output convolution, the classifier head and the
  prior (~21 k of Lite0's 3.8 M): norm-layer fine-tuning, the DP transfer recipe of De et al. 2022
  and Bu et al. 2022 (bias-term fine-tuning). Meant for a public → private fine-tune.
"""
from __future__ import annotations

import torch
from torch import nn

from common.nets.efficientnet import ChannelAffine

ENCODER_PREFIX = "backbone.encoder."  # MultiTaskNet naming of a pretrained-capable encoder
#: Always trained under ``norms``: the mask output convolution, the classifier head, the prior.
NORMS_MODULES = ("backbone.decoder.out.", "head.", "prior.")


def _channel_affine_grad_sample(layer: ChannelAffine, activations: list[torch.Tensor],
                                backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of y = w·x + b over (B, C, H, W): Σ_hw x·g and Σ_hw g, each (B, C)."""
    x = activations[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x * backprops).sum(dim=(2, 3))
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def register_grad_samplers() -> None:
    """Teach Opacus the folded-BatchNorm affine (idempotent; opacus imported only under DP)."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    if ChannelAffine not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(ChannelAffine)(_channel_affine_grad_sample)


def _norm_parameters(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, ChannelAffine)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def frozen_for_dp(model: nn.Module, trainable: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs ``trainable`` leaves out of DP-SGD (still requiring grad;
    the caller freezes and later restores them). ValueError when the mode does not fit the model."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if trainable == "all":
        return []
    if trainable == "decoder":
        frozen = [(n, p) for n, p in named if n.startswith(ENCODER_PREFIX)]
        if not frozen:
            raise ValueError(f"privacy.trainable 'decoder': the model has no '{ENCODER_PREFIX}*' parameters")
        return frozen
    if trainable == "norms":
        norms = _norm_parameters(model)
        if not norms:
            raise ValueError("privacy.trainable 'norms': the model has no GroupNorm or affine norm layers")
        return [(n, p) for n, p in named
                if not (id(p) in norms or n.endswith(".bias") or n.startswith(NORMS_MODULES))]
    raise ValueError(f"privacy.trainable: unknown {trainable!r} (all | decoder | norms)")
