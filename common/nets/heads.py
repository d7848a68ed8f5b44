"""Malignancy heads reading the backbone's feature maps (list, deepest first)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BottleneckHead(nn.Module):
    """Global average pool of the deepest features → dropout → linear; returns (B,) logits."""

    def __init__(self, feature_channels: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_channels[0], 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = feats[0].mean(dim=(-2, -1))
        return self.fc(self.dropout(pooled)).squeeze(-1)


class MultiScaleHead(nn.Module):
    """CMSVNetIter-style: pool the bottleneck and the next ``n_stages - 1`` decoder stages, apply
    LayerNorm to each pooled vector (stages differ in scale by orders of magnitude), concatenate,
    dropout, linear. Returns (B,) logits."""

    def __init__(self, feature_channels: Sequence[int], dropout: float, n_stages: int = 4) -> None:
        super().__init__()
        self.n = min(n_stages, len(feature_channels))
        chans = list(feature_channels[: self.n])
        self.norms = nn.ModuleList([nn.LayerNorm(c) for c in chans])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(sum(chans), 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [norm(f.mean(dim=(-2, -1))) for norm, f in zip(self.norms, feats[: self.n])]
        return self.fc(self.dropout(torch.cat(pooled, dim=1))).squeeze(-1)


HEADS = {"bottleneck": BottleneckHead, "multiscale": MultiScaleHead}
