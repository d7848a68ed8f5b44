"""Training-time augmentation of whole batches on the training device.

``augment_batch`` is the one entry point (``common.train`` calls it per step, after the batch is
on its device); its ranges come from ``common.config.AugmentConfig``. ``depth_splice`` and
``lateral_roll`` are the centre-shift-specific transforms: BrEaST's lesions sit in the upper
third of a shallow field of view and mid-width, while BUSI's and BUS-UCLM's deeper, wider scans
put hypoechoic fat lobules there, which a BrEaST-trained model segments instead of the deeper or
off-centre lesion. Splicing another image's lesion-free near field above a lesion shows the
model lesions below real near-field tissue; rolling shows it lesions off mid-width.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from common.config import AugmentConfig


def depth_splice(
    images: torch.Tensor, masks: torch.Tensor, geometry: AugmentConfig,
    rand: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``geometry.depth_splice`` per image of (B,1,H,W): push the image down by
    k rows (k uniform in [0, ``depth_splice_max`` · H]) and fill the top k rows with the top k
    rows of another image of the batch (donor i + 1 + ⌊u·(B−1)⌋ mod B). k is capped at the
    donor's first lesion row, so no lesion pixel of the donor becomes background; the rows
    pushed out at the bottom are dropped with their mask. ``rand(*shape)`` draws U[0, 1)."""
    b, _, h, _ = images.shape
    apply = rand(b) < geometry.depth_splice
    donor = (torch.arange(b, device=images.device) + 1 + (rand(b) * (b - 1)).long().clamp(max=b - 2)) % b
    rows = torch.arange(h, device=images.device)
    lesion_rows = masks.amax(dim=(1, 3)) > 0  # (B,H)
    first = torch.where(lesion_rows, rows, h).amin(1)  # first lesion row, H when none
    k = (rand(b) * geometry.depth_splice_max * h).long()
    k = torch.where(apply, torch.minimum(k, first[donor]), 0)  # (B,)
    top = rows[None, :] < k[:, None]  # (B,H): rows taken from the donor
    src_img = torch.where(top, donor[:, None], torch.arange(b, device=images.device)[:, None])
    src_row = torch.where(top, rows[None, :], rows[None, :] - k[:, None])
    spliced = images[src_img, 0, src_row][:, None]  # (B,1,H,W)
    new_masks = torch.where(top[:, None, :, None], 0.0, masks[src_img, 0, src_row][:, None])
    return spliced, new_masks.to(masks.dtype)


def lateral_roll(
    images: torch.Tensor, masks: torch.Tensor, geometry: AugmentConfig,
    rand: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``geometry.lateral_roll`` per image of (B,1,H,W): roll it (and its mask)
    sideways by k columns, k uniform in ±``lateral_roll_max`` · W; what leaves one side comes
    back on the other. BrEaST's lesion centres sit at 39–60 % of the width (5th–95th
    percentile), BUSI's at 24–76 %; a BrEaST-trained model misses many lesions off mid-width
    (``benchmarks.lesion_position``). Linear-probe frames hold tissue out to both edges, so the
    seam joins tissue to tissue, unlike a translation that fills with black. Measured: BUSI
    gains a little, never significantly; the far lesions gain, the centred ones sometimes lose."""
    b, _, _, w = images.shape
    apply = rand(b) < geometry.lateral_roll
    k = torch.round((rand(b) * 2 - 1) * geometry.lateral_roll_max * w).long()
    k = torch.where(apply, k, 0)
    cols = (torch.arange(w, device=images.device)[None, :] - k[:, None]) % w  # (B,W) source column
    index = cols[:, None, None, :].expand(-1, images.shape[1], images.shape[2], -1)
    return images.gather(-1, index), masks.gather(-1, index.expand(-1, masks.shape[1], -1, -1))


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
    geometry: AugmentConfig = AugmentConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched augmentation of (B,1,S,S) images in [0,1] and {0,1} masks, on the batch's device.

    Random horizontal flip (never vertical: depth has a direction — attenuation, posterior
    shadowing and enhancement lie below the lesion); one affine per image (by default rotation
    ±10°, scale 0.9–1.1, translation ±5 % of the side, optional aspect ``stretch``; ranges from
    ``geometry``, uniform draws) applied to the whole batch with one ``affine_grid`` /
    ``grid_sample`` after the optional ``depth_splice`` and ``lateral_roll`` (masks resampled
    bilinearly, then > 0.5, so they stay binary); gain 0.8–1.2, contrast 0.85–1.15 about the
    image mean, gamma e^±0.3; multiplicative speckle-like noise (Gaussian at half resolution, upsampled, σ ≤ 0.15). Random numbers come
    from ``generator`` on its own device (CPU by default) so a seed gives the same batch whatever
    device trains."""
    b, _, h, w = images.shape
    dev, gdev = images.device, generator.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=gdev).to(dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=gdev).to(dev)

    if geometry.depth_splice > 0 and b > 1:
        images, masks = depth_splice(images, masks, geometry, rand)
    if geometry.lateral_roll > 0:  # drawn only when on, so configs without it keep their stream
        images, masks = lateral_roll(images, masks, geometry, rand)
    flip = rand(b) < 0.5
    angle = (rand(b) * 2 - 1) * math.radians(geometry.rotate_deg)
    scale = 1 - geometry.scale + rand(b) * 2 * geometry.scale
    shift = (rand(b, 2) * 2 - 1) * 2 * geometry.translate  # affine_grid spans [-1, 1]: 2 = the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sx = torch.where(flip, -1.0, 1.0)
    sy = torch.ones_like(sx)
    if geometry.stretch > 0:  # drawn only when on, so configs without it keep their random stream
        root = torch.exp((rand(b) * 2 - 1) * 0.5 * math.log1p(geometry.stretch))  # √a
        sx, sy = sx / root, sy * root  # output x samples input x / √a: content √a wider, √a less tall
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, shift[:, 0]], 1),
         torch.stack([sin * sx, cos * sy, shift[:, 1]], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks.to(images.dtype), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    masks = (masks > 0.5).to(images.dtype)

    gain = 0.8 + rand(b, 1, 1, 1) * 0.4
    contrast = 0.85 + rand(b, 1, 1, 1) * 0.3
    gamma = torch.exp((rand(b, 1, 1, 1) * 2 - 1) * 0.3)
    sigma = rand(b, 1, 1, 1) * 0.15
    noise = randn(b, 1, max(1, h // 2), max(1, w // 2))
    noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).pow(gamma)
    mean = images.mean(dim=(-2, -1), keepdim=True)
    images = ((images - mean) * contrast + mean) * gain
    images = images * (1 + sigma * noise)
    return images.clamp_(0.0, 1.0), masks


def augmentation(augment: bool | AugmentConfig | None) -> AugmentConfig | None:
    """``augment`` argument → ranges: True means the defaults, False/None means off."""
    if isinstance(augment, AugmentConfig):
        return augment
    return AugmentConfig() if augment else None
