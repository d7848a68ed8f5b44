"""The learnable composite malignancy prior φ over the BI-RADS features of ``common.birads``.

``BiradsPrior`` (standardisation buffers + a sign-constrained linear head) is the only trainable
part of the prior and travels with the model (``MultiTaskNet.prior``), while ``common.birads``
holds the parameter-free, differentiable feature extractors; kept separate so each stays small
and the feature code has no ``nn.Module`` state. ``common.birads`` re-exports ``BiradsPrior`` and
``CLINICAL_SIGN``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import PAPER_FEATURES

#: Direction in which each feature raises the malignancy prior (BI-RADS lexicon): larger,
#: rougher, less compact, heterogeneous, taller-than-wide, indistinct, shadowing.
CLINICAL_SIGN: dict[str, int] = {
    "area": +1,
    "roughness": +1,
    "compactness": +1,
    "texture": +1,
    "orientation": +1,
    "margin_sharpness": -1,
    "posterior": +1,
}


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _PriorHead(nn.Module):
    """φ-logit = Σ w_k·z_k + b. Parameters only (no buffers), so Opacus can compute per-sample
    gradients for it with functorch; the signs are a Python tuple, not a buffer, for the same
    reason and so FedAvg never touches them."""

    def __init__(self, signs: Sequence[int], sign_constrained: bool, init_weight: float,
                 min_weight: float) -> None:
        super().__init__()
        self.signs = tuple(int(s) for s in signs)
        self.sign_constrained = sign_constrained
        self.min_weight = float(min_weight)
        if sign_constrained:
            raw = _inverse_softplus(max(init_weight - min_weight, 1e-3))
            init = torch.full((len(self.signs),), raw)
        else:
            init = torch.tensor([s * init_weight for s in self.signs], dtype=torch.float32)
        self.raw_weight = nn.Parameter(init)
        self.bias = nn.Parameter(torch.zeros(1))

    def effective_weight(self) -> Tensor:
        if not self.sign_constrained:
            return self.raw_weight
        signs = torch.tensor(self.signs, device=self.raw_weight.device,
                             dtype=self.raw_weight.dtype)
        return signs * (self.min_weight + F.softplus(self.raw_weight))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.effective_weight() + self.bias


class BiradsPrior(nn.Module):
    """Composite malignancy prior φ = sigmoid(Σ w_k·f̃_k + b) over standardised features.

    Standardisation uses running mean/var buffers (EMA, detached), updated in training mode from
    the rows selected by ``track`` and frozen in eval; batch statistics are never used, so a
    batch of one (Poisson sampling under DP) is fine and samples do not interact. f̃ is softly
    clipped to ±``clip`` so an outlier mask cannot saturate φ.

    Anti-collapse: with ``sign_constrained`` w_k = sign_k·(min_weight + softplus(raw_k)), sign_k
    from :data:`CLINICAL_SIGN`. MSE(p̂, φ) alone is minimised by a constant φ = mean p̂, which
    an unconstrained prior reaches by w → 0 (or by flipping signs to follow a wrong classifier).
    Here no weight can change sign, and |w_k| ≥ min_weight > 0, so φ always moves with the
    features in the clinical direction; it can only be made weak, never constant or reversed.
    """

    def __init__(
        self,
        names: Sequence[str] = PAPER_FEATURES,
        sign_constrained: bool = True,
        *,
        init_weight: float = 0.5,
        min_weight: float = 0.05,
        momentum: float = 0.05,
        clip: float = 3.0,
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        unknown = [n for n in self.names if n not in CLINICAL_SIGN]
        if unknown or not self.names:
            raise ValueError(f"BiradsPrior: bad feature names {list(self.names)}; "
                             f"known: {list(CLINICAL_SIGN)}")
        k = len(self.names)
        self.sign_constrained = sign_constrained
        self.momentum = momentum
        self.clip = clip
        self.track_running_stats = True  # set False to freeze the statistics (e.g. under DP)
        self.head = _PriorHead([CLINICAL_SIGN[n] for n in self.names], sign_constrained,
                               init_weight, min_weight if sign_constrained else 0.0)
        self.register_buffer("running_mean", torch.zeros(k))
        self.register_buffer("running_var", torch.ones(k))
        self.register_buffer("num_updates", torch.zeros(()))  # float: survives FedAvg averaging

    def weights(self) -> dict[str, float]:
        """Effective signed weights, for reports."""
        w = self.head.effective_weight().detach().cpu().tolist()
        return dict(zip(self.names, w))

    @torch.no_grad()
    def describe(self) -> dict[str, object]:
        """What the prior learned, readable: {"features": {name: {"weight" (per standard
        deviation, signed), "per_unit" (per clinical unit of the feature: weight / std), "mean",
        "std"}}, "bias" (logit at the mean features), "bias_per_unit" (logit at all features 0)}.
        The per-unit form ignores the soft clip, exact within about one std of the mean."""
        w = self.head.effective_weight().detach().double().cpu()
        mean = self.running_mean.detach().double().cpu()
        std = torch.sqrt(self.running_var.detach().double().cpu() + 1e-6)
        bias = float(self.head.bias.detach().double().cpu()[0])
        features = {name: {"weight": float(w[k]), "per_unit": float(w[k] / std[k]),
                           "mean": float(mean[k]), "std": float(std[k])}
                    for k, name in enumerate(self.names)}
        return {"features": features, "bias": bias,
                "bias_per_unit": bias - float((w * mean / std).sum())}

    @torch.no_grad()
    def update_stats(self, feats: Tensor) -> None:
        """EMA update from (N,K) feature rows; the first updates are a running average."""
        feats = feats.detach().to(self.running_mean.dtype)
        feats = feats[torch.isfinite(feats).all(1)]
        if feats.shape[0] == 0:
            return
        m = max(self.momentum, 1.0 / (float(self.num_updates) + 1.0))
        self.running_mean.lerp_(feats.mean(0), m)
        if feats.shape[0] >= 2:
            self.running_var.lerp_(feats.var(0, unbiased=True).clamp(min=1e-6), m)
        self.num_updates.add_(1.0)

    def standardise(self, feats: Tensor) -> Tensor:
        z = (feats - self.running_mean) / torch.sqrt(self.running_var + 1e-6)
        return self.clip * torch.tanh(z / self.clip)

    def forward(self, feats: Tensor, track: Tensor | bool = True) -> Tensor:
        """φ (B,) in (0,1) from features (B,K). In training mode the running statistics first
        absorb the rows where ``track`` is True (a bool (B,) tensor, or True/False for all)."""
        return torch.sigmoid(self.logit(feats, track))

    def logit(self, feats: Tensor, track: Tensor | bool = True) -> Tensor:
        """logit(φ) (B,); same contract as ``forward`` (for losses that want logits)."""
        if feats.dim() != 2 or feats.shape[1] != len(self.names):
            raise ValueError(f"BiradsPrior expects (B,{len(self.names)}) features for "
                             f"{self.names}, got {tuple(feats.shape)}")
        if self.training and self.track_running_stats:
            if isinstance(track, Tensor):
                self.update_stats(feats[track.to(torch.bool)])
            elif track:
                self.update_stats(feats)
        return self.head(self.standardise(feats.to(self.running_mean.dtype)))
