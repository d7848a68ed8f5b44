"""The one prediction path: trained networks → mask and malignancy, as ``InferenceConfig`` says.

Simulation scoring, federated evaluation (server and sites), the benchmarks and the predict
command all predict through here, so a recipe scores the same everywhere:

1. each member's frozen-BatchNorm affines are folded into its convolutions (``fold_affine``:
   the same function, a faster forward pass; members without them are used as they are);
2. the members' probabilities are averaged (an ensemble: probabilities, not logits, so one
   over-confident member does not decide alone); a member trained at another image size sees
   the image resized to its size and its mask is resized back;
3. test-time views (``common.tta``): the horizontal mirror (``flip``) and the image shifted up
   (``depth_shifts``);
4. each member's malignancy probability over its views is calibrated by its temperature T
   (``common.calibration``, saved in its model file): sigmoid(logit(p) / T), before the members
   are averaged, so an ensemble averages calibrated members; T = 1 leaves it untouched;
5. after the forward pass (``predict``): the mask probabilities outside the largest 8-connected
   component of (mask ≥ ``threshold``) are set to 0 (``largest_component``: one lesion per image).

The predictor returns logits (the logit of the averaged probabilities, clamped at 1e-6), the
output contract of every network here, so it goes wherever a network goes; one member at its
own size with no view returns that member's logits unchanged (the malignancy logit divided by T).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from common.config import InferenceConfig
from common.data.tensors import TensorData
from common.evaluate import EvalResult, score
from common.evaluate import predict as network_probs
from common.nets.efficientnet import fold_affine
from common.postprocess import largest_component  # noqa: F401  (torch-free; re-exported)
from common.tta import check_shifts, view_probs

_EPS = 1e-6  # logit clamp of averaged probabilities


class Predictor(nn.Module):
    """forward(x (B,1,S,S) normalised) → (mask logits (B,1,S,S), malignancy logits (B,)) of the
    mean of ``members``' probabilities over the views ``flip`` and ``shifts``, each member's
    malignancy calibrated by its temperature. ``sizes``: the image side each member was trained
    at (None: the input's own); ``temperatures``: each member's T (None: all 1)."""

    def __init__(self, members: Sequence[nn.Module], flip: bool = False, shifts: Sequence[float] = (),
                 sizes: Sequence[int | None] | None = None,
                 temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("Predictor: no member")
        if sizes is not None and len(sizes) != len(members):
            raise ValueError(f"Predictor: {len(sizes)} sizes for {len(members)} members")
        if temperatures is not None and len(temperatures) != len(members):
            raise ValueError(f"Predictor: {len(temperatures)} temperatures for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.flip = bool(flip)
        self.shifts = check_shifts(shifts)
        self.sizes: tuple[int | None, ...] = tuple(sizes) if sizes is not None else (None,) * len(members)
        temps = tuple(float(t) for t in temperatures) if temperatures is not None else (1.0,) * len(members)
        if not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"Predictor: temperatures must be finite and > 0, got {list(temps)}")
        self.temperatures: tuple[float, ...] = temps

    def _native(self, i: int, x: Tensor) -> bool:
        s = self.sizes[i]
        return s is None or (s, s) == tuple(x.shape[-2:])

    def _member_probs(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Member i's (mask, malignancy) probabilities on one view, uncalibrated."""
        if self._native(i, x):
            m, c = self.members[i](x)
            return torch.sigmoid(m), torch.sigmoid(c.reshape(-1))
        s, hw = self.sizes[i], tuple(x.shape[-2:])
        m, c = self.members[i](F.interpolate(x, size=(s, s), mode="bilinear", antialias=True,
                                             align_corners=False))
        back = F.interpolate(torch.sigmoid(m), size=hw, mode="bilinear", align_corners=False)
        return back, torch.sigmoid(c.reshape(-1))

    def member_view_probs(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Member i's (mask, malignancy) probabilities over the views, malignancy calibrated."""
        mask, cls = view_probs(lambda v: self._member_probs(i, v), x, self.flip, self.shifts)
        t = self.temperatures[i]
        if t != 1.0:
            cls = torch.sigmoid(torch.logit(cls, eps=_EPS) / t)
        return mask, cls

    def probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mask probabilities (B,1,S,S), malignancy probabilities (B,)): the members' mean on x
        over the views (a mean of means: the same as averaging the members per view)."""
        if len(self.members) == 1:
            return self.member_view_probs(0, x)
        outs = [self.member_view_probs(i, x) for i in range(len(self.members))]
        return torch.stack([o[0] for o in outs]).mean(0), torch.stack([o[1] for o in outs]).mean(0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if len(self.members) == 1 and not self.flip and not self.shifts and self._native(0, x):
            m, c = self.members[0](x)  # nothing to average: the member's own logits
            t = self.temperatures[0]
            return (m, c) if t == 1.0 else (m, c / t)
        mask, cls = self.probs(x)
        return torch.logit(mask, eps=_EPS), torch.logit(cls, eps=_EPS)


def build_predictor(models: Sequence[nn.Module], cfg: InferenceConfig,
                    sizes: Sequence[int | None] | None = None, *, fold: bool = True,
                    temperatures: Sequence[float] | None = None) -> Predictor:
    """The predictor of ``models`` (one network, or the members of an ensemble) with the views of
    ``cfg``, in eval mode. ``fold``: predict with ``fold_affine`` copies (the models themselves
    are left untouched then; a model without frozen-BatchNorm affines is used as it is and is put
    in eval mode). ``temperatures``: each model's malignancy temperature (its model file's
    ``temperature``; None: 1, uncalibrated). Post-processing is ``predict``'s, after the forward
    pass."""
    members = [fold_affine(m) if fold else m for m in models]
    return Predictor(members, cfg.flip, cfg.depth_shifts, sizes, temperatures).eval()


def predict(predictor: nn.Module, data: TensorData, cfg: InferenceConfig, batch_size: int = 32,
            device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mask probabilities (N,1,S,S) float32, malignancy probabilities (N,) float32) of
    ``predictor`` on ``data`` (raw images; normalised here), in data order, with
    ``cfg.largest_component`` applied to the mask. Any network works as ``predictor``."""
    probs, p_mal = network_probs(predictor, data, batch_size=batch_size, device=device)
    if cfg.largest_component:
        probs = largest_component(probs, cfg.threshold)
    return probs, p_mal


def evaluate(model: nn.Module, data: TensorData, cfg: InferenceConfig | None = None, *,
             batch_size: int = 32, device: str | torch.device | None = None) -> EvalResult:
    """Predict ``data`` the way ``cfg`` says and score it (``common.evaluate.score``, mask and
    malignancy decided at ``cfg.threshold``). ``model``: a ``Predictor`` (used as it is) or one
    network (wrapped by ``build_predictor``)."""
    cfg = cfg if cfg is not None else InferenceConfig()
    predictor = model if isinstance(model, Predictor) else build_predictor([model], cfg)
    probs, p_mal = predict(predictor, data, cfg, batch_size, device)
    return score(probs, p_mal, data, threshold=cfg.threshold, mask_threshold=cfg.threshold)


def describe(cfg: InferenceConfig) -> str:
    """One line for reports, e.g. 'image + mirror + shifted up by 0.15, 0.3 of the height'."""
    views = ["image"] + (["mirror"] if cfg.flip else [])
    if cfg.depth_shifts:
        views.append(f"shifted up by {', '.join(f'{s:g}' for s in cfg.depth_shifts)} of the height")
    text = " + ".join(views) if len(views) > 1 else "the raw model"
    if cfg.largest_component:
        text += "; largest connected component of the mask"
    return text
