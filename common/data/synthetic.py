"""Embedded synthetic multi-centre breast-ultrasound data: the default of the simulation and tests.

Each image is B-mode-like: layered tissue, depth attenuation, speckle of a centre-specific grain,
and one hypoechoic lesion whose appearance follows BI-RADS. Benign: oval/round, circumscribed,
parallel (wider than tall), homogeneous, posterior enhancement or none. Malignant: irregular with
angular/spiculated margins, taller-than-wide, heterogeneous, indistinct edge, posterior shadowing.
Each sign is drawn with a class-dependent probability, so classes overlap (a good classifier is
well above chance but not perfect). Centres differ in gain, contrast, speckle grain, noise,
native resolution and overlays, mimicking the domain shift between hospitals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from common.records import Case, Label


@dataclass(frozen=True)
class CentreStyle:
    """Acquisition shifts of one synthetic centre."""

    name: str
    gain: float  # overall brightness
    gamma: float  # contrast curve
    grain: float  # speckle correlation length in pixels at 128 px
    noise: float  # additive electronic noise
    native: int  # native render resolution, then resized to the requested size
    attenuation: float  # brightness loss with depth
    overlays: bool  # caliper crosses / text-like marks (as in BUSI)
    p_malignant: float
    p_normal: float
    images_per_patient: int


SYNTHETIC_CENTRES: dict[str, CentreStyle] = {
    s.name: s
    for s in (
        CentreStyle("SynPL", 1.00, 1.00, 1.2, 0.03, 128, 0.35, False, 0.40, 0.02, 1),
        CentreStyle("SynES1", 0.85, 1.25, 1.6, 0.02, 112, 0.50, False, 0.35, 0.00, 1),
        CentreStyle("SynEG", 1.15, 0.85, 0.9, 0.05, 96, 0.25, True, 0.32, 0.15, 1),
        CentreStyle("SynES2", 0.95, 1.10, 2.0, 0.04, 144, 0.45, False, 0.35, 0.40, 6),
    )
}


def _lesion_mask(rng: np.random.Generator, n: int, malignant: bool) -> tuple[np.ndarray, dict[str, str]]:
    """Boolean (n,n) lesion and its descriptors, in polar form r(θ) around a centre."""
    irregular = rng.random() < (0.8 if malignant else 0.2)
    tall = rng.random() < (0.65 if malignant else 0.1)
    spiculated = irregular and rng.random() < (0.6 if malignant else 0.3)
    radius = n * rng.uniform(0.09, 0.2)
    aspect = rng.uniform(1.1, 1.5) if tall else rng.uniform(0.55, 0.9)  # height / width
    theta = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    r = np.ones_like(theta)
    if irregular:
        for k in range(2, 7):
            r += rng.uniform(0.03, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    else:
        r += rng.uniform(0.0, 0.04) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    if spiculated:
        k = int(rng.integers(7, 14))
        r += rng.uniform(0.12, 0.25) * np.maximum(0, np.cos(k * theta + rng.uniform(0, 2 * np.pi))) ** 6
    cy = rng.uniform(0.3, 0.55) * n
    cx = rng.uniform(0.3, 0.7) * n
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    dy, dx = (yy - cy) / (radius * np.sqrt(aspect)), (xx - cx) / (radius / np.sqrt(aspect))
    ang = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    rr = np.interp(ang, theta, r, period=2 * np.pi)
    mask = np.hypot(dy, dx) <= rr
    desc = {
        "Shape": "irregular" if irregular else ("round" if 0.8 < aspect < 1.25 else "oval"),
        "Margin": "not circumscribed - spiculated" if spiculated
        else ("not circumscribed - angular" if irregular else "circumscribed"),
        "Orientation": "not parallel" if tall else "parallel",
    }
    return mask, desc


def _speckle(rng: np.random.Generator, n: int, grain: float) -> np.ndarray:
    """Rayleigh-like multiplicative speckle with correlation length ``grain`` px, mean ≈ 1."""
    re = ndimage.gaussian_filter(rng.standard_normal((n, n)), grain)
    im = ndimage.gaussian_filter(rng.standard_normal((n, n)), grain)
    amp = np.hypot(re, im)
    return amp / (amp.mean() + 1e-8)


def _render(rng: np.random.Generator, style: CentreStyle, label: Label) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    n = style.native
    yy, xx = np.mgrid[0:n, 0:n] / n
    # Layered tissue: skin line, fat, glandular band with undulating boundaries.
    band = 0.35 + 0.08 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 2) + rng.uniform(0, 1)))
    tissue = 0.35 + 0.25 * (yy > band) * (yy < band + 0.35) + 0.15 * (yy < 0.06)
    tissue = ndimage.gaussian_filter(tissue, 2.0 * n / 128)
    mask = np.zeros((n, n), dtype=bool)
    desc: dict[str, str] = {"Shape": "not applicable", "Margin": "not applicable",
                            "Orientation": "not applicable", "Posterior_features": "not applicable"}
    if label != Label.NORMAL:
        malignant = label == Label.MALIGNANT
        mask, desc = _lesion_mask(rng, n, malignant)
        soft = mask.astype(float)
        blur = rng.uniform(1.2, 2.5) if (malignant and rng.random() < 0.7) else rng.uniform(0.3, 0.8)
        soft = ndimage.gaussian_filter(soft, blur * n / 128)
        inside = rng.uniform(0.05, 0.18)
        hetero = rng.uniform(0.2, 0.5) if (malignant and rng.random() < 0.7) else rng.uniform(0.0, 0.12)
        blotch = ndimage.gaussian_filter(rng.standard_normal((n, n)), 3 * n / 128)
        lesion_val = inside * (1 + hetero * blotch / (blotch.std() + 1e-8))
        tissue = tissue * (1 - soft) + np.clip(lesion_val, 0.01, 1) * soft
        # Posterior features: a column beneath the lesion darker (shadowing) or brighter.
        p = rng.random()
        post = ("shadowing" if p < 0.6 else "no") if malignant else ("enhancement" if p < 0.4 else ("no" if p < 0.9 else "shadowing"))
        desc["Posterior_features"] = post
        if post != "no":
            cols = mask.any(0)
            bottom = np.where(mask.any(1))[0].max()
            column = ndimage.gaussian_filter(cols.astype(float), 2.0 * n / 128)[None, :] * (np.arange(n)[:, None] > bottom)
            column = column * np.exp(-(np.arange(n)[:, None] - bottom).clip(0) / (0.4 * n))
            tissue = tissue * (1 - 0.6 * column) if post == "shadowing" else tissue * (1 + 0.5 * column)
    atten = np.exp(-style.attenuation * yy)
    img = tissue * atten * _speckle(rng, n, style.grain * n / 128) * style.gain
    img = img + style.noise * rng.standard_normal((n, n))
    img = np.clip(img, 0, None) ** style.gamma
    img = img / max(np.percentile(img, 99.5), 1e-6)
    if style.overlays and rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 3))):  # caliper crosses
            y, x = rng.integers(4, n - 4, size=2)
            img[y - 2 : y + 3, x] = 1.0
            img[y, x - 2 : x + 3] = 1.0
        img[2:5, 3 : 3 + n // 6] = 0.9  # a text-like bar
    return np.clip(img, 0, 1), mask, desc


def _resize(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    z = size / img.shape[0]
    out = ndimage.zoom(img, z, order=1)
    m = ndimage.zoom(mask.astype(np.float32), z, order=1) >= 0.5
    return out[:size, :size], m[:size, :size]


def make_centre(name: str, n: int, size: int = 128, seed: int = 0) -> list[Case]:
    """``n`` cases of synthetic centre ``name`` at ``size``² (uint8 image, bool mask)."""
    if name not in SYNTHETIC_CENTRES:
        raise KeyError(f"unknown synthetic centre {name!r}; known: {sorted(SYNTHETIC_CENTRES)}")
    style = SYNTHETIC_CENTRES[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    fov_mm = 40.0
    cases = []
    for i in range(n):
        u = rng.random()
        label = Label.NORMAL if u < style.p_normal else (
            Label.MALIGNANT if u < style.p_normal + style.p_malignant * (1 - style.p_normal) else Label.BENIGN)
        img, mask, desc = _render(rng, style, label)
        if img.shape[0] != size:
            img, mask = _resize(img, mask, size)
        if label != Label.NORMAL and not mask.any():  # lesion lost to resizing: mark centre pixel
            mask[size // 2, size // 2] = True
        cases.append(Case(
            image=(img * 255).round().astype(np.uint8),
            mask=mask,
            label=label,
            case_id=f"{name}-{i:04d}",
            patient_id=f"{name}-p{i // style.images_per_patient:04d}",
            centre=name,
            spacing_mm=fov_mm / size,
            descriptors=desc,
            source=f"synthetic:{name}:{i}",
        ))
    return cases


def make_federation(
    n_per_centre: int, size: int = 128, seed: int = 0, centres: Sequence[str] | None = None
) -> dict[str, list[Case]]:
    """One synthetic dataset per centre, deterministic given ``seed``."""
    names = list(centres) if centres is not None else list(SYNTHETIC_CENTRES)
    return {c: make_centre(c, n_per_centre, size=size, seed=seed) for c in names}
