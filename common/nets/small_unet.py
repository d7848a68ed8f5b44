"""The default CPU-friendly backbone: a residual U-Net assembled from MONAI blocks.

``depth`` resolution levels with ``base_channels·2^i`` channels (the deepest one is the
bottleneck), so depth 4 from 16 channels downsamples three times (128 px → 16 px) and has
about 0.9 M parameters. Upsampling is bilinear after a 1×1 conv (MONAI ``UpSample`` in
"nontrainable" mode), because Opacus has no per-sample-gradient rule for transposed convs.
"""
from __future__ import annotations

import torch
from monai.networks.blocks import ResidualUnit, UpSample
from torch import nn

from common.nets.blocks import monai_norm

_ACT = ("leakyrelu", {"negative_slope": 0.01})


def _unit(cin: int, cout: int, stride: int, num_groups: int, subunits: int) -> ResidualUnit:
    return ResidualUnit(
        spatial_dims=2,
        in_channels=cin,
        out_channels=cout,
        strides=stride,
        kernel_size=3,
        subunits=subunits,
        act=_ACT,
        norm=monai_norm(cout, num_groups),
    )


class SmallUNet(nn.Module):
    """forward(x (B,C,S,S)) -> (mask_logits (B,1,S,S), [bottleneck, decoder stages deep → shallow]).

    S must be divisible by 2^(depth-1).
    """

    def __init__(self, in_channels: int, base_channels: int = 16, depth: int = 4, num_groups: int = 8) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"small U-Net needs depth >= 2, got {depth}")
        chans = [base_channels * 2**i for i in range(depth)]
        self.down_factor = 2 ** (depth - 1)
        self.encoder = nn.ModuleList(
            [_unit(in_channels, chans[0], 1, num_groups, 2)]
            + [_unit(chans[i - 1], chans[i], 2, num_groups, 2) for i in range(1, depth)]
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(depth - 1, 0, -1):
            self.up.append(
                UpSample(
                    spatial_dims=2,
                    in_channels=chans[i],
                    out_channels=chans[i - 1],
                    scale_factor=2,
                    mode="nontrainable",
                    interp_mode="bilinear",
                    align_corners=False,
                )
            )
            self.decoder.append(_unit(2 * chans[i - 1], chans[i - 1], 1, num_groups, 2))
        self.out = nn.Conv2d(chans[0], 1, 1)
        self.feature_channels: tuple[int, ...] = tuple(chans[::-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.shape[-1] % self.down_factor or x.shape[-2] % self.down_factor:
            raise ValueError(
                f"input side {tuple(x.shape[-2:])} must be divisible by {self.down_factor}"
            )
        skips = []
        for unit in self.encoder:
            x = unit(x)
            skips.append(x)
        stages = [x]
        for up, unit, skip in zip(self.up, self.decoder, skips[-2::-1]):
            x = unit(torch.cat([up(x), skip], dim=1))
            stages.append(x)
        return self.out(x), stages
