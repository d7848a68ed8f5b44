"""MixStyle (Zhou et al., ICLR 2021): feature-statistics mixing, a domain-generalisation layer.

Scanners differ in gain, speckle and post-processing, which early CNN features carry as their
per-channel mean and standard deviation ("style"). In training, with probability ``p`` per batch,
each image's per-channel statistics of a feature map (B,C,H,W) are replaced by a random convex
mix with those of another image of the batch, λ ~ Beta(α, α): the decoder sees the same anatomy
under styles between those of the training images. Identity in eval mode and when ``p`` is 0.

It couples the images of a batch, so per-sample gradients (DP-SGD) would be wrong:
``train_local`` refuses it under a privacy session.
"""
from __future__ import annotations

import torch
from torch import nn



class MixStyle(nn.Module):
    """See the module docstring. No parameters; random numbers from torch's global generator."""

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0 or alpha <= 0:
            raise ValueError(f"MixStyle: need 0 ≤ p ≤ 1 and α > 0, got p={p}, α={alpha}")
        self.p, self.alpha, self.eps = p, alpha, eps

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if not self.training or self.p == 0 or b < 2 or torch.rand(()).item() >= self.p:
            return x
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((b, 1, 1, 1)).to(x)
        perm = torch.randperm(b).to(x.device)
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sig = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * mix_sig + mix_mu
