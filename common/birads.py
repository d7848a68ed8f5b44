"""Differentiable BI-RADS-inspired lesion features and the composite malignancy prior φ.

The learnable prior φ itself (``BiradsPrior``, ``CLINICAL_SIGN``) is in ``common.prior`` and
re-exported here.

Every feature is a smooth function of the soft mask P (B,1,H,W) in [0,1] (and of the raw image I
for the intensity features), built only from convolutions and reductions so that it is batched,
cheap next to the network, and has finite values and gradients for empty, full and 1-pixel masks.

Lengths are measured in pixels and then made dimensionless (ratios, or fractions of the image
side), so a feature does not change when the same picture is resampled to another size. The pixel
spacing is deliberately *not* used by the features: it is unknown at several centres (BUSI,
BUS-UCLM), and a prior fed mm² at some sites and image fractions at others would mix units. Use
:func:`lesion_area_mm2` to report physical sizes.

Feature definitions (Pσ = Gaussian blur of P with σ pixels, ∇ = Sobel/8, |g|ε = √(g²+ε) − √ε):
- area: √(ΣP / (H·W)), the lesion's equivalent side as a fraction of the image side.
- compactness: per² / (4π·ΣP) with per = Σ|∇P₀.₅|ε; 1.00 ± 0.03 for a disc of radius ≥ 4 px,
  4/π for a square, larger for irregular shapes (the 0.5-px pre-blur calibrates the digital
  perimeter, which otherwise overestimates a disc by 3–11 %).
- roughness: per(P₀.₅) / per(Ps) − 1 with s = 0.15·r_eq (r_eq = √(ΣP/π)), i.e. the fraction of
  boundary length that lives at scales finer than 15 % of the lesion radius. ≥ 0 because blurring
  never increases total variation; tying s to the lesion size keeps a disc's value near 0.02 at
  any size. s is not differentiated; per(Ps) is interpolated in log σ between a fixed ladder of
  blurs σ = 0.5·2^j px computed on a pyramid (no per-image convolution; cheap).
- texture: weighted standard deviation of the lightly smoothed image inside the lesion (weights
  P·(erode(P) + 0.01), min-pool erosion by side/48 px, so the edge contrast does not read as
  heterogeneity), in units of the intensity std outside the lesion (the unit of all three
  intensity features: gain/offset invariant, not inflated by the lesion's own contrast).
- orientation: log(σ_y / σ_x) from the P-weighted second moments of the pixel coordinates;
  > 0 when taller than wide (not parallel to the skin), translation invariant.
- margin_sharpness: |mean outward normal derivative of the smoothed image along the boundary|
  = |Σ ∇I·∇P| / Σ|∇P|, per 1/128 of the image side (= per pixel at 128 px). Speckle cancels in
  the signed mean; an indistinct (blurred or low-contrast) margin gives a low value. A pixel-sharp
  edge saturates at the working resolution, so compare values at one image size.
- posterior: (mean I beside − mean I beneath) / intensity unit, with the lesion grown by side/64 px
  (max-pool) so its own soft edge is in neither region. "Beneath": outside the grown lesion,
  with lesion in the side/8 rows above (soft OR, 1 − exp(−3·ΣP)); "beside": those depths spread
  ±side/4 horizontally, minus every pixel with lesion anywhere above it (the whole acoustic
  column). Shadowing > 0, enhancement < 0.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import ALL_FEATURES
from common.prior import CLINICAL_SIGN, BiradsPrior  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = ALL_FEATURES

_EPS_GRAD = 1e-6  # inside √(g²+ε): finite gradient where the mask is flat
_EPS_MASS = 1.0  # pixels; denominators of P-weighted means stay ≥ 1 so gradients stay bounded
_PRE_BLUR = 0.5  # px; calibrates the digital perimeter (see module docstring)
_ROUGH_REL = 0.15  # roughness blur as a fraction of the equivalent radius
_SOFT_OR = 3.0  # 1 − exp(−3·Σ P): ≈ 0.95 once one pixel's worth of lesion is present
_IMAGE_NEEDED = {"texture", "margin_sharpness", "posterior"}


def _gauss_taps(sigma: float) -> list[float]:
    radius = max(1, math.ceil(3.0 * sigma))
    k = [math.exp(-(i * i) / (2.0 * sigma * sigma)) for i in range(-radius, radius + 1)]
    total = sum(k)
    return [v / total for v in k]


def _taps(x: Tensor, taps: Sequence[float], dim: int, mode: str) -> Tensor:
    """Centred 1-D correlation along ``dim`` (-1 or -2) as a sum of shifted slices: on CPU this
    is several times faster than conv2d with a single-channel kernel, forwards and backwards."""
    r = len(taps) // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    xp = F.pad(x, pad, mode=mode)
    n = x.shape[dim]
    out = None
    for i, t in enumerate(taps):
        if t == 0.0:
            continue
        term = t * xp.narrow(dim, i, n)
        out = term if out is None else out + term
    assert out is not None
    return out


def _blur(x: Tensor, sigma: float, mode: str = "constant") -> Tensor:
    """Separable Gaussian blur of (B,1,H,W); "constant" pads with 0 (outside = background)."""
    if sigma < 0.2:
        return x
    taps = _gauss_taps(sigma)
    return _taps(_taps(x, taps, -1, mode), taps, -2, mode)


def _sobel(x: Tensor, mode: str = "constant") -> tuple[Tensor, Tensor]:
    """Sobel/8 derivatives (per pixel) of (B,1,H,W): (d/dx, d/dy), same size."""
    smooth, diff = (0.25, 0.5, 0.25), (-0.5, 0.0, 0.5)
    gx = _taps(_taps(x, diff, -1, mode), smooth, -2, mode)
    gy = _taps(_taps(x, smooth, -1, mode), diff, -2, mode)
    return gx, gy


def _magnitude(gx: Tensor, gy: Tensor) -> Tensor:
    return torch.sqrt(gx**2 + gy**2 + _EPS_GRAD) - math.sqrt(_EPS_GRAD)


def _perimeter(p: Tensor) -> Tensor:
    """Soft perimeter in pixels, (B,), of an already pre-blurred mask."""
    return _magnitude(*_sobel(p)).flatten(1).sum(1)


def _sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def _wmean(x: Tensor, w: Tensor) -> Tensor:
    return _sum(w * x) / (_sum(w) + _EPS_MASS)


def _box_rows_above(x: Tensor, n: int) -> Tensor:
    """Mean of x over the n rows directly above each pixel (zero beyond the top); O(1) per pixel
    via a cumulative sum."""
    c = F.pad(torch.cumsum(x, dim=-2), (0, 0, n + 1, 0))  # c[k] = Σ rows < k − n
    h = x.shape[-2]
    return (c[..., n : n + h, :] - c[..., :h, :]) / n


def _box_cols(x: Tensor, n: int) -> Tensor:
    """Mean of x over ±n columns (zero padded), via a cumulative sum."""
    c = F.pad(torch.cumsum(F.pad(x, (n, n, 0, 0)), dim=-1), (1, 0, 0, 0))
    w = x.shape[-1]
    return (c[..., 2 * n + 1 : 2 * n + 1 + w] - c[..., :w]) / (2 * n + 1)


class _Features:
    """Lazily shared intermediates for one batch, so only requested features are computed."""

    def __init__(self, prob: Tensor, image: Tensor | None) -> None:
        self.p = prob
        self.img = image
        self.h, self.w = prob.shape[-2:]
        self.side = float(max(self.h, self.w))
        self.mass = _sum(prob)  # (B,) pixels
        self._cache: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor:
        if key not in self._cache:
            self._cache[key] = getattr(self, "_" + key)()
        return self._cache[key]

    # shared intermediates -------------------------------------------------------------------
    def _p0(self) -> Tensor:
        return _blur(self.p, _PRE_BLUR)

    def _perimeter(self) -> Tensor:
        return _perimeter(self.get("p0"))

    def _grad_p0(self) -> Tensor:
        return torch.cat(_sobel(self.get("p0")), 1)

    def _image_std(self) -> Tensor:
        """Intensity unit: std of the smoothed image outside the lesion (gain/offset invariant,
        and, unlike the whole-image std, not inflated by the lesion's own contrast)."""
        img = self.get("img_smooth")
        outside = 1.0 - self.p
        mean = _wmean(img, outside)
        var = _wmean((img - mean[:, None, None, None]) ** 2, outside)
        return torch.sqrt(var + 1e-4)

    def _img_smooth(self) -> Tensor:
        assert self.img is not None
        return _blur(self.img, max(0.5, self.side / 128.0), mode="replicate")

    # features ---------------------------------------------------------------------------------
    def _area(self) -> Tensor:
        return torch.sqrt(self.mass / (self.h * self.w) + 1e-6) - 1e-3

    def _compactness(self) -> Tensor:
        per = self.get("perimeter")
        return per**2 / (4.0 * math.pi * (self.mass + _EPS_MASS))

    def _roughness(self) -> Tensor:
        per0 = self.get("perimeter")
        r_eq = torch.sqrt(self.mass.detach() / math.pi)
        sigma = (_ROUGH_REL * r_eq).clamp(min=_PRE_BLUR)
        # Ladder of total blur σ_j = 0.5·2^j px (full-resolution pixels) up to the largest σ in
        # the batch, on a pyramid: once σ_j reaches 2 current pixels the mask is halved
        # (its perimeter, in full-resolution pixels, is then the coarse one times the scale).
        top = float(sigma.max()) if sigma.numel() else _PRE_BLUR
        n_levels = max(2, math.ceil(math.log2(max(top, _PRE_BLUR) / _PRE_BLUR)) + 1)
        pers, cur, var, scale = [per0], self.get("p0"), _PRE_BLUR**2, 1.0
        for j in range(1, n_levels):
            s = _PRE_BLUR * 2.0**j
            if s / scale >= 2.0 and min(cur.shape[-2:]) >= 32:
                cur = F.pad(cur, (0, cur.shape[-1] % 2, 0, cur.shape[-2] % 2))
                cur = F.avg_pool2d(cur, 2)
                var += 0.25 * scale**2  # a 2-px box adds variance 1/4 px² (at the old scale)
                scale *= 2.0
            cur = _blur(cur, math.sqrt(max(s**2 - var, 0.0)) / scale)
            var = max(var, s**2)
            pers.append(scale * _perimeter(cur))
        table = torch.stack(pers, 1)  # (B, L)
        t = torch.log2(sigma / _PRE_BLUR).clamp(0, n_levels - 1 - 1e-6)
        j = t.floor().long()
        frac = (t - j.to(t.dtype)).to(table.dtype)
        lo = table.gather(1, j[:, None])[:, 0]
        hi = table.gather(1, (j + 1)[:, None])[:, 0]
        per_s = (1 - frac) * lo + frac * hi
        return (per0 + 1e-3) / (per_s + 1e-3) - 1.0

    def _texture(self) -> Tensor:
        img = self.get("img_smooth")
        e = max(1, round(self.side / 48.0))
        eroded = -F.max_pool2d(-self.p, 2 * e + 1, stride=1, padding=e)
        weight = self.p * (eroded + 0.01)  # the 0.01 keeps lesions thinner than 2e measurable
        mean = _wmean(img, weight)
        var = _wmean((img - mean[:, None, None, None]) ** 2, weight)
        return torch.sqrt(var + 1e-8) / self.get("image_std")

    def _orientation(self) -> Tensor:
        ys = (torch.arange(self.h, device=self.p.device, dtype=self.p.dtype) + 0.5) / self.side
        xs = (torch.arange(self.w, device=self.p.device, dtype=self.p.dtype) + 0.5) / self.side
        py = self.p.sum(-1)[:, 0]  # (B,H) row marginal
        px = self.p.sum(-2)[:, 0]  # (B,W) column marginal
        denom = self.mass + _EPS_MASS
        my = (py * ys).sum(1) / denom
        mx = (px * xs).sum(1) / denom
        vy = (py * (ys[None] - my[:, None]) ** 2).sum(1) / denom
        vx = (px * (xs[None] - mx[:, None]) ** 2).sum(1) / denom
        eps = (0.5 / self.side) ** 2
        return 0.5 * (torch.log(vy + eps) - torch.log(vx + eps))

    def _margin_sharpness(self) -> Tensor:
        gp = self.get("grad_p0")
        gi = torch.cat(_sobel(self.get("img_smooth"), mode="replicate"), 1)
        normal_deriv = -(gi * gp).sum(1)  # = |∇P|·∂I/∂n with n the outward normal
        weight = _magnitude(gp[:, :1], gp[:, 1:])[:, 0]
        mean = _sum(normal_deriv) / (_sum(weight) + _EPS_MASS)
        per_ref = mean * (self.side / 128.0) / self.get("image_std")
        return torch.sqrt(per_ref**2 + 1e-6) - 1e-3

    def _posterior(self) -> Tensor:
        assert self.img is not None
        depth = max(2, round(self.side / 8.0))
        reach = max(2, round(self.side / 4.0))
        gap = max(1, round(self.side / 64.0))  # keep the lesion's own soft edge out of both regions
        grown = F.max_pool2d(self.p, 2 * gap + 1, stride=1, padding=gap)
        outside = 1.0 - grown
        # soft "there is lesion above this pixel" (any depth / within `depth` rows), via soft-OR
        above_any = torch.cumsum(grown, dim=2) - grown
        shadow_cols = 1.0 - torch.exp(-_SOFT_OR * above_any)
        near = 1.0 - torch.exp(-_SOFT_OR * depth * _box_rows_above(grown, depth))
        below = near * outside
        spread = 1.0 - torch.exp(-_SOFT_OR * (2 * reach + 1) * _box_cols(below, reach))
        beside = spread * (1.0 - shadow_cols) * outside
        return (_wmean(self.img, beside) - _wmean(self.img, below)) / self.get("image_std")


def birads_features(
    prob: Tensor,
    image: Tensor | None,
    spacing_mm: Tensor | None = None,
    names: Sequence[str] = ALL_FEATURES,
) -> Tensor:
    """Features (B,K) in the order of ``names`` from soft masks ``prob`` (B,1,H,W) in [0,1] and raw
    images ``image`` (B,1,H,W) in [0,1] (only needed for texture, margin_sharpness, posterior).

    ``spacing_mm`` is accepted for interface symmetry and ignored: every feature is resolution
    independent by construction (see the module docstring).
    """
    del spacing_mm
    names = tuple(names)
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"unknown BI-RADS feature(s) {unknown}; known: {list(FEATURE_NAMES)}")
    if prob.dim() != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B,1,H,W), got {tuple(prob.shape)}")
    # at least float32: sums over 256² pixels overflow float16 (e.g. under autocast)
    prob = prob.to(torch.promote_types(prob.dtype, torch.float32))
    if _IMAGE_NEEDED.intersection(names):
        if image is None:
            raise ValueError(f"features {sorted(_IMAGE_NEEDED.intersection(names))} need the image")
        if image.shape != prob.shape:
            raise ValueError(f"image {tuple(image.shape)} and prob {tuple(prob.shape)} differ")
        image = image.to(prob.dtype)
    ctx = _Features(prob, image)
    if not names:
        return prob.new_zeros(prob.shape[0], 0)
    return torch.stack([ctx.get(n) for n in names], 1)


def lesion_area_mm2(prob: Tensor, spacing_mm: Tensor) -> Tensor:
    """Lesion area in mm² (B,) from soft masks (B,1,H,W); NaN where the spacing is unknown."""
    return _sum(prob) * spacing_mm.to(prob.dtype) ** 2
