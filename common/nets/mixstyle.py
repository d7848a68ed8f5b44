"""MixStyle (Zhou et al., ICLR 2021): feature-statistics mixing, a domain-generalisation layer.

Scanners differ in gain, speckle and post-processing, which early CNN features carry as their
per-channel mean and standard deviation ("style"). In training, with probability ``p`` per batch,
each image's per-channel statistics of a feature map (B,C,H,W) are replaced by a random convex
mix with those of another image of the batch, λ ~ Beta(α, α): the decoder sees the same anatomy
under styles between those of the training images. Identity in eval mode and when ``p`` is 0.

``mode="dsu"`` (Li et al., ICLR 2022, "DSU"): instead of mixing with one other image, each
image's statistics are shifted by Gaussian noise scaled by their spread across the batch,
μ' = μ + ε·std_B(μ), log σ' = log σ + ε'·std_B(log σ): styles around, and beyond, those of the
batch. (The paper shifts σ itself; in log space σ' stays positive and the content never flips.)

It couples the images of a batch, so per-sample gradients (DP-SGD) would be wrong:
``train_local`` refuses it under a privacy session.
"""
from __future__ import annotations

import torch
from torch import nn


MODES = ("mix", "dsu")


class MixStyle(nn.Module):
    """See the module docstring. No parameters; random numbers from torch's global generator."""

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6, mode: str = "mix") -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0 or alpha <= 0:
            raise ValueError(f"MixStyle: need 0 ≤ p ≤ 1 and α > 0, got p={p}, α={alpha}")
        if mode not in MODES:
            raise ValueError(f"MixStyle: mode {mode!r} unknown; known: {list(MODES)}")
        self.p, self.alpha, self.eps, self.mode = p, alpha, eps, mode

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if not self.training or self.p == 0 or b < 2 or torch.rand(()).item() >= self.p:
            return x
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        if self.mode == "dsu":
            new_mu = mu + torch.randn_like(mu) * (mu.var(dim=0, keepdim=True) + self.eps).sqrt()
            log_sig = sig.log()
            spread = (log_sig.var(dim=0, keepdim=True) + self.eps).sqrt()
            new_sig = (log_sig + torch.randn_like(sig) * spread).exp()
            return (x - mu) / sig * new_sig + new_mu
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((b, 1, 1, 1)).to(x)
        perm = torch.randperm(b).to(x.device)
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sig = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * mix_sig + mix_mu
