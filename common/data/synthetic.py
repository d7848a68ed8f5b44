"""Embedded synthetic multi-centre breast ultrasound: the default data of the simulation and tests.

Images are B-mode-like: skin line, subcutaneous fat with lobules, a glandular band with bright
streaks, retromammary fat, pectoral muscle, dark chest wall, depth attenuation, and multiplicative
speckle (Rayleigh amplitude of a complex Gaussian field correlated over the centre's grain, partly
compounded), log-compressed to the display. Each lesion image has one hypoechoic mass whose
signs follow BI-RADS through a latent severity s ∈ (0, 1): s ~ Beta(4, 8) for benign and
Beta(8, 4) for malignant, and every sign (irregular / angular / microlobulated / spiculated
outline, taller-than-wide orientation, indistinct margin, heterogeneous interior, echogenic halo,
calcifications, posterior enhancement → shadowing, size) is a noisy function of s only. The label
reaches the pixels only through s, so no classifier can beat the AUC of s itself (≈ 0.96); the
drawn sign parameters themselves give ≈ 0.91 (boosted trees), a small CNN on image + mask ≈ 0.87:
classes overlap (benign irregular and malignant oval masses occur).

The four centres differ in acquisition, not in anatomy (see ``SYNTHETIC_CENTRES``): gain, display
gamma, speckle grain, electronic noise, native resolution (rendered at size·native_scale, then
resized), residual depth attenuation, field of view (so lesion size in pixels), a convex-probe fan,
BUSI-like caliper/text overlays, depth ticks, class balance, share of normal images, and how many
images one patient contributes (re-imaging of the same mass: splits must group by patient).
Deterministic given ``seed``; vectorised per image (Fourier-synthesised random fields; the mass is
evaluated only in its window), a few ms per 128-px image on one core.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage

from common.records import Case, Label

BETA_BENIGN, BETA_MALIGNANT = (4.0, 8.0), (8.0, 4.0)  # latent severity s


@dataclass(frozen=True)
class CentreStyle:
    """Acquisition shifts of one synthetic centre (``mirrors``: the real centre it loosely imitates)."""

    name: str
    mirrors: str
    gain: float  # display gain after log compression
    gamma: float  # display curve exponent; > 1 darkens mid-tones (more contrast)
    grain: float  # speckle correlation length (axial σ) as a fraction of the image side
    noise: float  # additive electronic noise σ on the [0, 1] display
    native_scale: float  # rendered at round(size · native_scale)², then resized: < 1 blurs
    attenuation: float  # residual (uncompensated) depth loss: display × exp(−a · depth/side)
    fov_mm: float  # field of view (width = depth) in mm: sets lesion size in pixels and spacing
    reports_spacing: bool  # False: spacing_mm is None, as in BUSI
    overlays: float  # probability of caliper crosses and text-like marks, as in BUSI
    depth_ticks: bool  # 1 cm dots along the right edge
    sector: bool  # convex-probe fan: black outside it, lesions kept inside
    p_malignant: float  # share of malignant among lesion images
    p_normal: float  # share of normal images
    images_per_patient: int  # each patient contributes 1..this many images (same mass)


SYNTHETIC_CENTRES: dict[str, CentreStyle] = {
    s.name: s
    for s in (
        # Reference look: mid gain, fine grain, full resolution, spacing known, almost no normals.
        CentreStyle("SynPL", "BrEaST (Poland)", gain=1.0, gamma=1.0, grain=0.003, noise=0.02,
                    native_scale=1.0, attenuation=0.6, fov_mm=40.0, reports_spacing=True,
                    overlays=0.0, depth_ticks=False, sector=False,
                    p_malignant=0.39, p_normal=0.02, images_per_patient=1),
        # Dark, high-contrast, coarser and blurred, strong attenuation, convex fan, no normals.
        CentreStyle("SynES1", "UDIAT (Spain)", gain=0.9, gamma=1.35, grain=0.0045, noise=0.015,
                    native_scale=0.75, attenuation=1.0, fov_mm=38.0, reports_spacing=True,
                    overlays=0.0, depth_ticks=True, sector=True,
                    p_malignant=0.33, p_normal=0.0, images_per_patient=1),
        # Bright, low gamma, blotchy low-resolution speckle, noisy, overlays, spacing unknown.
        CentreStyle("SynEG", "BUSI (Egypt)", gain=1.12, gamma=0.8, grain=0.006, noise=0.045,
                    native_scale=0.55, attenuation=0.35, fov_mm=50.0, reports_spacing=False,
                    overlays=0.6, depth_ticks=False, sector=False,
                    p_malignant=0.32, p_normal=0.17, images_per_patient=2),
        # Very fine speckle rendered above output resolution, many normals, up to 6 views a patient.
        CentreStyle("SynES2", "BUS-UCLM (Spain)", gain=0.95, gamma=1.15, grain=0.002, noise=0.03,
                    native_scale=1.25, attenuation=0.5, fov_mm=45.0, reports_spacing=True,
                    overlays=0.0, depth_ticks=True, sector=False,
                    p_malignant=0.34, p_normal=0.4, images_per_patient=6),
    )
}

_FAN_APEX, _FAN_TAN = 0.6, 0.32  # apex this far above the top edge; half-angle tangent
_DB_RANGE, _DB_OFFSET = 30.0, 20.0  # log compression: display = (20·log10(amplitude) + offset) / range
_SPECKLE_POWER, _SPECKLE_FLOOR = 0.5, 0.2  # partly compounded speckle: no black nulls in tissue


@dataclass(frozen=True)
class _Mass:
    """One lesion in normalised coordinates (image side = 1) and its severity-driven signs."""

    cx: float
    cy: float
    a: float  # half width before rotation
    b: float  # half height
    angle: float
    harmonics: np.ndarray  # (H, 3): k, amplitude, phase of r(θ) = 1 + Σ amp·cos(kθ + phase)
    spikes: np.ndarray  # (P, 3): angle, amplitude, angular width of von Mises bumps on r(θ)
    blur_mm: float  # margin width: sharp (circumscribed) … indistinct
    echo: float  # interior echo level (background gland ≈ 0.6)
    hetero: float
    halo: float
    calcs: int
    posterior: float  # log brightness factor beneath the mass: > 0 enhancement, < 0 shadowing

    def extent(self) -> float:
        """Radius of a circle around (cx, cy) that holds the whole mass."""
        reach = 1 + np.abs(self.harmonics[:, 1]).sum() + (self.spikes[:, 1].max() if len(self.spikes) else 0)
        return float(max(self.a, self.b) * reach)

    def level(self, side: int, pad_px: float) -> tuple[slice, slice, np.ndarray]:
        """Signed distance-like field in pixels (< 0 inside) on the window of a side² grid that
        holds the mass plus ``pad_px``; everything outside the window is outside the mass."""
        reach = self.extent() * side + pad_px
        win = [slice(max(0, int(c * side - reach)), min(side, int(np.ceil(c * side + reach)) + 1))
               for c in (self.cy, self.cx)]
        ys = ((np.arange(win[0].start, win[0].stop, dtype=np.float32) + 0.5) / side)[:, None] - self.cy
        xs = ((np.arange(win[1].start, win[1].stop, dtype=np.float32) + 0.5) / side)[None, :] - self.cx
        c, s = float(np.cos(self.angle)), float(np.sin(self.angle))
        u, v = (xs * c + ys * s) / float(self.a), (-xs * s + ys * c) / float(self.b)
        rho = np.hypot(u, v)
        z = (u + 1j * v) / np.maximum(rho, 1e-6)  # e^{iθ}: harmonics by multiplication, no trig
        r, power, k_now = np.ones_like(rho), np.ones_like(z), 0
        for k, amp, phase in sorted(self.harmonics.tolist()):
            for _ in range(int(k) - k_now):
                power *= z
            k_now = int(k)
            r += amp * (power * np.exp(1j * phase)).real  # amp·cos(kθ + phase)
        for at, amp, width in self.spikes:
            r += amp * np.exp(((z * np.exp(-1j * at)).real - 1) / width**2)  # von Mises bump
        return win[0], win[1], (rho - r) * float(np.sqrt(self.a * self.b) * side)

    def mask(self, side: int) -> np.ndarray:
        out = np.zeros((side, side), bool)
        sy, sx, dist = self.level(side, 1.0)
        out[sy, sx] = dist < 0
        return out


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(side, dtype=np.float32) + 0.5) / side
    return t[:, None], t[None, :]


@lru_cache(maxsize=64)
def _spectral_gain(side: int, sy: float, sx: float) -> np.ndarray:
    """rfft2-layout Gaussian transfer function (σ = (sy, sx)·side pixels), scaled so that white
    spectral noise of unit pixel variance comes out with unit variance (Parseval)."""
    fy, fx = sfft.fftfreq(side)[:, None], sfft.fftfreq(side)[None, :]
    full = np.exp(-2 * np.pi**2 * ((sy * side * fy) ** 2 + (sx * side * fx) ** 2))
    half = full[:, : side // 2 + 1]
    return (half * side / np.sqrt(2 * np.mean(full**2))).astype(np.float32)


def _field(rng: np.random.Generator, side: int, sy: float, sx: float) -> np.ndarray:
    """Gaussian random field (side, side), zero mean, unit variance in expectation, periodic,
    correlated over σ (sy, sx) given as fractions of the side. Synthesised in the Fourier domain
    (white complex spectrum × Gaussian gain, one inverse FFT): cheaper than a wide blur kernel."""
    gain = _spectral_gain(side, sy, sx)
    spec = rng.standard_normal((*gain.shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    spec *= gain
    return sfft.irfft2(spec, s=(side, side))


def _fan(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Convex-probe field of view: inside a wedge from an apex above the frame, below its arc."""
    dy = ys + _FAN_APEX
    return (np.abs(xs - 0.5) < _FAN_TAN * dy) & (np.hypot(xs - 0.5, dy) > _FAN_APEX + 0.03)


def _draw_mass(rng: np.random.Generator, malignant: bool, style: CentreStyle) -> _Mass:
    """Signs from the latent severity s, each with its own noise; centred at (0.5, 0.5) (see
    ``_place``). Size depends on s too, never on the label directly."""
    s = rng.beta(*(BETA_MALIGNANT if malignant else BETA_BENIGN))

    def sign(sd: float = 0.15) -> float:
        return float(np.clip(s + rng.normal(0, sd), 0, 1))

    cyst = s < 0.3 and rng.random() < 0.4  # anechoic, round-ish, posterior enhancement
    irr = sign()
    low = [[k, 0.16 * irr**2 * rng.uniform(0.4, 1), rng.uniform(0, 2 * np.pi)] for k in (2, 3, 4)]
    high = [[k, 0.05 * max(irr - 0.4, 0) * rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)]
            for k in rng.choice(np.arange(5, 11), 2, replace=False)]
    n_spikes = int(rng.poisson(14 * max(sign() - 0.6, 0)))
    spikes = np.column_stack([rng.uniform(-np.pi, np.pi, n_spikes), rng.uniform(0.25, 0.6, n_spikes),
                              rng.uniform(0.05, 0.1, n_spikes)]).reshape(-1, 3)
    aspect = float(np.exp(rng.normal(-0.6 + 1.2 * s, 0.18)))  # height / width
    diam = float(np.clip(np.exp(rng.normal(np.log(8 + 12 * s), 0.3)), 4, 32)) / style.fov_mm
    return _Mass(
        cx=0.5, cy=0.5, a=diam / 2 / np.sqrt(aspect), b=diam / 2 * np.sqrt(aspect),
        angle=rng.normal(0, 0.12), harmonics=np.array(low + high), spikes=spikes,
        blur_mm=0.08 if cyst else 0.1 + 1.3 * sign() ** 2,
        echo=rng.uniform(0.02, 0.04) if cyst else rng.uniform(0.11, 0.22),
        hetero=0.0 if cyst else 0.05 + 0.5 * sign() ** 2,
        halo=0.3 * float(sign(0.12) > 0.72),
        calcs=int(rng.integers(2, 7)) if rng.random() < 0.5 * sign(0.2) ** 2 else 0,
        posterior=0.45 if cyst else float(np.clip(rng.normal(0.7 - 1.8 * s, 0.3), -1.5, 0.45)),
    )


def _place(rng: np.random.Generator, m: _Mass, sector: bool) -> _Mass:
    """A random position with the whole mass inside the frame (and the fan): shrinks if needed."""
    for _ in range(20):
        ext = m.extent()
        if ext > 0.3:
            m = replace(m, a=m.a * 0.3 / ext, b=m.b * 0.3 / ext)
            continue
        cy = rng.uniform(max(0.28, ext + 0.06), min(0.68, 1 - ext - 0.06))
        half = 0.5 - ext - 0.04
        if sector:
            half = min(half, _FAN_TAN * (cy - ext + _FAN_APEX) - ext - 0.04)
        if half >= 0:
            return replace(m, cx=0.5 + rng.uniform(-0.9, 0.9) * half, cy=cy)
        m = replace(m, a=m.a * 0.85, b=m.b * 0.85)
    raise AssertionError("unreachable: a mass shrunk 20 times fits")


def _reimage(rng: np.random.Generator, m: _Mass, sector: bool) -> _Mass:
    """The same mass in another view: slightly rotated, rescaled and moved."""
    k = rng.uniform(0.9, 1.1)
    return _place(rng, replace(m, a=m.a * k, b=m.b * k, angle=m.angle + rng.normal(0, 0.08)), sector)


def _tissue(rng: np.random.Generator, side: int) -> np.ndarray:
    """Echo level (side, side) of normal anatomy: skin, subcutaneous fat (lobules, septa), glandular
    band (bright wavy streaks), retromammary fat, pectoral muscle, dark chest wall."""
    ys, xs = _grid(side)

    def wave(base: float, amp: float) -> np.ndarray:
        f1, f2, p1, p2 = rng.uniform(0.3, 1.2), rng.uniform(1.5, 3), rng.random(), rng.random()
        return base + amp * (np.sin(2 * np.pi * (xs * f1 + p1)) + 0.4 * np.sin(2 * np.pi * (xs * f2 + p2)))

    def step(b: np.ndarray, w: float = 0.012) -> np.ndarray:
        return 0.5 + 0.5 * np.tanh((ys - b) / (2 * w))

    skin, b1, b2 = wave(0.03, 0.004), wave(rng.uniform(0.12, 0.24), 0.03), wave(rng.uniform(0.7, 0.8), 0.04)
    b3 = b2 + rng.uniform(0.05, 0.1)  # pectoral fascia
    b4 = b3 + rng.uniform(0.08, 0.14)  # chest wall
    s1, s2, s3, s4 = step(b1), step(b2), step(b3, 0.006), step(b4, 0.02)
    fat, gland, muscle = rng.uniform(0.15, 0.25), rng.uniform(0.45, 0.65), rng.uniform(0.3, 0.4)
    level = fat + (gland - fat) * s1 + (fat - gland) * s2 + (muscle - fat) * s3 - 0.8 * muscle * s4
    lob = _field(rng, side, 0.025, 0.05)  # fat lobules: dark pockets, bright septa at zero crossings
    level += ((1 - s1) + s2 * (1 - s3)) * (-0.1 * np.tanh(lob) + 0.25 * np.exp(-((lob / 0.2) ** 2)))
    streak = _field(rng, side, 0.01, 0.06)
    level += s1 * (1 - s2) * (0.6 * np.exp(-((streak / 0.12) ** 2)) + 0.06 * streak)
    level += s3 * (1 - s4) * 0.08 * np.sin(2 * np.pi * (ys * 30 + xs * 5))  # muscle striation
    for b, amp, w in ((skin, 0.9, 0.007), (b1, 0.25, 0.005), (b3, 0.5, 0.006), (b4, 0.4, 0.008)):
        level += amp * np.exp(-0.5 * ((ys - b) / w) ** 2)
    return level


def _lesion(rng: np.random.Generator, level: np.ndarray, m: _Mass, fov_mm: float) -> np.ndarray:
    """Blend the mass into ``level`` (in place and returned): interior, margin, halo,
    calcifications, and the posterior column beneath it."""
    side = level.shape[0]
    blur = max(m.blur_mm / fov_mm * side, 0.3)
    sy, sx, dist = m.level(side, 6 * blur + 4)
    soft = 1 / (1 + np.exp(np.clip(dist / blur, -30, 30)))
    h, w = dist.shape
    n = sfft.next_fast_len(max(h, w))
    inside = m.echo * np.clip(1 + m.hetero * 2 * _field(rng, n, 0.06, 0.06)[:h, :w], 0.1, None)
    win = level[sy, sx]
    win += soft * (inside - win) + m.halo * np.exp(-0.5 * ((dist - 1.5 * blur) / (1.5 * blur + 0.5)) ** 2)
    if m.calcs:
        iy, ix = np.nonzero(dist < -1)
        pick = rng.choice(len(iy), min(m.calcs, len(iy)), replace=False)
        win[iy[pick], ix[pick]] += 1.0
    ys = _grid(side)[0][sy.start :]
    column = np.zeros((side - sy.start, w), np.float32)
    column[:h] = soft
    below = np.maximum.accumulate(column, axis=0) - column
    if m.posterior > 0:  # enhancement fades with depth; shadowing reaches the bottom
        below *= np.exp(-np.clip(ys - m.cy - m.b, 0, None) / 0.3)
    below = ndimage.uniform_filter1d(below, max(1, side // 40), axis=1)
    level[sy.start :, sx] *= np.exp(m.posterior * below)
    return level


def _overlays(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, style: CentreStyle) -> None:
    """In place on the output-size image: depth ticks; BUSI-like corner mark, calipers, text."""
    side = img.shape[0]
    g = max(1, side // 100)
    if style.depth_ticks:
        for y in np.arange(10.0, style.fov_mm, 10.0) / style.fov_mm * side:
            img[int(y) : int(y) + g, side - 2 * g : side - g] = 0.85
    if style.overlays <= 0 or rng.random() >= style.overlays:
        return
    img[g : 4 * g, g : 4 * g] = 0.9
    if mask.any():  # caliper crosses just outside the horizontal extremes of the mass
        ys, xs = np.nonzero(mask)
        arm = max(2, side // 40)
        for y, x in ((ys[xs.argmin()], xs.min() - arm), (ys[xs.argmax()], xs.max() + arm)):
            y, x = int(np.clip(y, arm, side - arm - 1)), int(np.clip(x, arm, side - arm - 1))
            img[y - arm : y + arm + 1, x] = 0.95
            img[y, x - arm : x + arm + 1] = 0.95
    glyphs = rng.random((int(rng.integers(4, 11)), 5, 3)) < 0.5  # a line of text-like marks
    y0, x0 = side - 8 * g, int(rng.uniform(0.2, 0.5) * side)
    for i, glyph in enumerate(glyphs):
        x = x0 + i * 4 * g
        if x + 3 * g <= side:
            img[y0 : y0 + 5 * g, x : x + 3 * g][np.kron(glyph, np.ones((g, g), bool))] = 0.9


def _render(rng: np.random.Generator, style: CentreStyle, size: int, mass: _Mass | None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image and bool mask, both (size, size). The image is rendered at the centre's native
    resolution; the mask is evaluated analytically on the output grid (no resampling error)."""
    side = max(24, round(size * style.native_scale))
    ys, xs = _grid(side)
    level = _tissue(rng, side)
    if mass is not None:
        level = _lesion(rng, level, mass, style.fov_mm)
    amp = np.clip(level, 1e-3, None) * np.exp(-style.attenuation * ys)
    g = style.grain
    env = np.hypot(_field(rng, side, g, 1.6 * g), _field(rng, side, g, 1.6 * g))  # Rayleigh amplitude
    amp *= _SPECKLE_FLOOR + (1 - _SPECKLE_FLOOR) * (env / env.mean()) ** _SPECKLE_POWER
    disp = style.gain * rng.uniform(0.93, 1.07) * (20 * np.log10(amp) + _DB_OFFSET) / _DB_RANGE
    disp = np.clip(disp, 0, 1) ** style.gamma
    disp += style.noise * rng.standard_normal(disp.shape, dtype=np.float32)
    if style.sector:
        disp *= _fan(ys, xs)
    img = np.asarray(Image.fromarray(disp.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    img = np.clip(img, 0, 1)
    mask = np.zeros((size, size), bool) if mass is None else mass.mask(size)
    if mass is not None and style.sector:
        mask &= _fan(*_grid(size))
    if mass is not None and not mask.any():  # a mass smaller than one output pixel
        mask[min(int(mass.cy * size), size - 1), min(int(mass.cx * size), size - 1)] = True
    _overlays(rng, img, mask, style)
    return (img * 255 + 0.5).astype(np.uint8), mask


def _descriptors(m: _Mass | None, mask: np.ndarray) -> dict[str, str]:
    """BI-RADS descriptors in BrEaST's vocabulary (plus Orientation), read off the drawn mass."""
    keys = ("Shape", "Margin", "Orientation", "Echogenicity", "Posterior_features", "Halo", "Calcifications")
    if m is None:
        return dict.fromkeys(keys, "not applicable")
    ys, xs = np.nonzero(mask)
    low, high = m.harmonics[:3, 1].sum(), m.harmonics[3:, 1].sum()
    signs = [name for name, on in (("spiculated", len(m.spikes) > 0), ("angular", low > 0.12),
                                   ("microlobulated", high > 0.03), ("indistinct", m.blur_mm > 0.5)) if on]
    irregular = len(m.spikes) > 0 or low > 0.12 or high > 0.03
    return {
        "Shape": "irregular" if irregular else ("round" if 0.85 < m.b / m.a < 1.18 else "oval"),
        "Margin": "not circumscribed - " + "&".join(signs) if signs else "circumscribed",
        "Orientation": "not parallel" if np.ptp(ys) > np.ptp(xs) else "parallel",
        "Echogenicity": "anechoic" if m.echo < 0.05 else "heterogeneous" if m.hetero > 0.25 else "hypoechoic",
        "Posterior_features": ("enhancement" if m.posterior > 0.25 else
                               "shadowing" if m.posterior < -0.25 else "no"),
        "Halo": "yes" if m.halo > 0 else "no",
        "Calcifications": "in a mass" if m.calcs else "no",
    }


def _plan(rng: np.random.Generator, style: CentreStyle, n: int) -> list[tuple[Label, int]]:
    """(label, images) per patient: exact class counts for ``n``, patients shuffled."""
    n_normal = round(n * style.p_normal)
    lesions = n - n_normal
    n_mal = round(lesions * style.p_malignant)
    if lesions >= 2:  # both lesion classes present whenever possible
        n_mal = min(max(n_mal, 1), lesions - 1)
    groups: list[tuple[Label, int]] = []
    for label, count in ((Label.NORMAL, n_normal), (Label.MALIGNANT, n_mal), (Label.BENIGN, lesions - n_mal)):
        while count > 0:
            k = min(count, int(rng.integers(1, style.images_per_patient + 1)))
            groups.append((label, k))
            count -= k
    order = rng.permutation(len(groups))
    return [groups[i] for i in order]


def make_centre(name: str, n: int, size: int = 128, seed: int = 0) -> list[Case]:
    """``n`` cases of synthetic centre ``name``: uint8 (size, size) image, bool mask, label,
    descriptors; spacing_mm = fov/size (None where the centre does not report it). Consecutive
    cases may share a patient (the same mass re-imaged)."""
    if name not in SYNTHETIC_CENTRES:
        raise KeyError(f"unknown synthetic centre {name!r}; known: {sorted(SYNTHETIC_CENTRES)}")
    style, key = SYNTHETIC_CENTRES[name], zlib.crc32(name.encode())
    cases: list[Case] = []
    for p, (label, k) in enumerate(_plan(np.random.default_rng([seed, key, 0]), style, n)):
        prng = np.random.default_rng([seed, key, 1, p])
        base = None
        if label != Label.NORMAL:
            base = _place(prng, _draw_mass(prng, label == Label.MALIGNANT, style), style.sector)
        for j in range(k):
            i = len(cases)
            rng = np.random.default_rng([seed, key, 2, i])
            mass = base if base is None or j == 0 else _reimage(rng, base, style.sector)
            img, mask = _render(rng, style, size, mass)
            cases.append(Case(
                image=img, mask=mask, label=label, case_id=f"{name}-{i:04d}", patient_id=f"{name}-p{p:04d}",
                centre=name, spacing_mm=style.fov_mm / size if style.reports_spacing else None,
                descriptors=_descriptors(mass, mask), source=f"synthetic:{name}:{i}",
            ))
    return cases


def make_federation(
    n_per_centre: int, size: int = 128, seed: int = 0, centres: Sequence[str] | None = None
) -> dict[str, list[Case]]:
    """One synthetic dataset per centre (all four by default), deterministic given ``seed``."""
    names = list(centres) if centres is not None else list(SYNTHETIC_CENTRES)
    return {c: make_centre(c, n_per_centre, size=size, seed=seed) for c in names}
