"""Shared building blocks: GroupNorm sizing, conv-GN-act, attention gate, attention U-Net decoder.

Every layer here is one Opacus computes per-sample gradients for natively (Conv2d, GroupNorm),
and no activation is in-place (in-place ops break the backward hooks DP-SGD relies on).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int, num_groups: int) -> int:
    """Largest group count ≤ ``num_groups`` that divides ``channels`` (GroupNorm requires it)."""
    return max(1, math.gcd(int(channels), int(num_groups)))


def group_norm(channels: int, num_groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, num_groups), channels, eps=eps)


def monai_norm(channels: int, num_groups: int) -> tuple[str, dict[str, int]]:
    """MONAI ``norm=`` argument for GroupNorm on ``channels`` channels."""
    return ("group", {"num_groups": group_count(channels, num_groups)})


class ConvGNAct(nn.Sequential):
    """3×3 conv → GroupNorm → LeakyReLU (not in-place)."""

    def __init__(self, cin: int, cout: int, num_groups: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
            group_norm(cout, num_groups),
            nn.LeakyReLU(0.01),
        )


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) applied to a skip connection.

    g (B,Cg,h,w) is the decoder signal already upsampled to the skip's size, x (B,Cx,h,w) the
    skip; returns x·ψ with ψ (B,1,h,w) in (0,1). Unlike MONAI's ``AttentionBlock`` (BatchNorm
    hard-coded) the projections use GroupNorm and ψ has no norm (GroupNorm over one channel
    would normalise the attention map per image, which is not what the gate means).
    """

    def __init__(self, cg: int, cx: int, cint: int, num_groups: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(cg, cint, 1, bias=False), group_norm(cint, num_groups))
        self.w_x = nn.Sequential(nn.Conv2d(cx, cint, 1, bias=False), group_norm(cint, num_groups))
        self.psi = nn.Conv2d(cint, 1, 1)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        psi = torch.sigmoid(self.psi(self.act(self.w_g(g) + self.w_x(x))))
        return x * psi


class AttentionDecoderBlock(nn.Module):
    """Upsample to the skip's size, gate the skip, concatenate, two conv-GN-act."""

    def __init__(self, cin: int, cskip: int, cout: int, num_groups: int) -> None:
        super().__init__()
        self.gate = AttentionGate(cin, cskip, max(cskip // 2, 8), num_groups) if cskip else None
        self.conv = nn.Sequential(
            ConvGNAct(cin + cskip, cout, num_groups), ConvGNAct(cout, cout, num_groups)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if skip is not None and self.gate is not None:
            x = torch.cat([x, self.gate(x, skip)], dim=1)
        return self.conv(x)


class AttentionUNetDecoder(nn.Module):
    """Attention-gated U-Net decoder over encoder features at strides 2,4,8,16,32.

    encoder_channels: channels of those features, shallow → deep. One block per skip (deep →
    shallow) plus a last block back to the input resolution without a skip. forward returns
    (mask_logits (B,1,S,S), [bottleneck, decoder stage outputs deep → shallow]).
    ``final_block=False`` drops that last block: the logits come from the stride-2 stage and are
    upsampled bilinearly. The dropped block sees no encoder feature (there is no stride-1 skip),
    yet at full resolution it takes about a fifth of a lite0 training step (benchmarks/perf_channels_last.py).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        num_groups: int,
        final_block: bool = True,
    ) -> None:
        super().__init__()
        enc = list(encoder_channels)
        if len(decoder_channels) != len(enc):
            raise ValueError(
                f"need {len(enc)} decoder channel counts (one per skip + the final block), "
                f"got {len(decoder_channels)}"
            )
        skips = enc[:-1][::-1] + [0]
        channels = list(decoder_channels) if final_block else list(decoder_channels)[:-1]
        blocks, cin = [], enc[-1]
        for cskip, cout in zip(skips, channels):
            blocks.append(AttentionDecoderBlock(cin, cskip, cout, num_groups))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(cin, 1, 1)
        self.feature_channels: tuple[int, ...] = (enc[-1], *channels)

    def forward(
        self, feats: Sequence[torch.Tensor], size: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = feats[-1]
        skips: list[torch.Tensor | None] = list(feats[:-1])[::-1] + [None]
        stages = [x]
        for block, skip in zip(self.blocks, skips):
            target = skip.shape[-2:] if skip is not None else size
            x = block(x, skip, target)
            stages.append(x)
        logits = self.out(x)
        if logits.shape[-2:] != tuple(size):  # no final block: stride-2 logits → input size
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits, stages
