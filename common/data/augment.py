"""Training-time augmentation of whole batches on the training device.

``augment_batch`` is the one entry point (``common.train`` calls it per step, after the batch is
on its device); its ranges come from ``common.config.AugmentConfig``. ``depth_splice`` and
``negative_crop`` are the centre-shift-specific transforms: BrEaST's lesions sit in the upper
third of a shallow field of view, while BUSI's and BUS-UCLM's deeper scans put hypoechoic fat
lobules there, which a BrEaST-trained model segments instead of the deeper lesion (the failure
mode of docs/external_validation.md). Splicing another image's lesion-free near field above a
lesion shows the model lesions below real near-field tissue; lesion-free crops show it dark
structures that are not lesions.
"""
from __future__ import annotations

import math
from dataclasses import replace
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


def negative_crop(
    images: torch.Tensor, masks: torch.Tensor, geometry: AugmentConfig,
    rand: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``geometry.negative_crop`` per lesion image of (B,1,H,W): replace it by
    the largest square of itself that keeps a margin of 3 % of the side from the lesion's
    bounding box (above, below, left or right of it), resized to H×W, with an empty mask.
    Squares with a side under ``negative_crop_min`` × the image side are not taken (that image
    is kept as it is), which bounds the zoom. BrEaST has 4 lesion-free images in 256, so a model
    trained on it marks a dark structure in almost every image; these crops show it fat lobules,
    ducts and posterior shadows that carry no mask."""
    b, _, h, w = images.shape
    dev = images.device
    rows_any, cols_any = masks.amax(dim=(1, 3)) > 0, masks.amax(dim=(1, 2)) > 0  # (B,H), (B,W)
    r, c = torch.arange(h, device=dev), torch.arange(w, device=dev)
    margin = round(0.03 * min(h, w))
    top = (torch.where(rows_any, r, h).amin(1) - margin).clamp(min=0)  # free rows [0, top)
    bottom = (torch.where(rows_any, r + 1, 0).amax(1) + margin).clamp(max=h)  # free [bottom, h)
    left = (torch.where(cols_any, c, w).amin(1) - margin).clamp(min=0)
    right = (torch.where(cols_any, c + 1, 0).amax(1) + margin).clamp(max=w)
    sides = torch.stack([top.clamp(max=w), (h - bottom).clamp(max=w),
                         left.clamp(max=h), (w - right).clamp(max=h)], 1)  # (B,4) above/below/left/right
    side, band = sides.max(1)
    apply = (rows_any.any(1) & (rand(b) < geometry.negative_crop)
             & (side >= geometry.negative_crop_min * min(h, w)))
    along = rand(b)  # where along its band the square sits
    y_free = torch.floor(along * (h - side + 1).float()).long()
    x_free = torch.floor(along * (w - side + 1).float()).long()
    y0 = torch.stack([top - side, bottom, y_free, y_free], 1).gather(1, band[:, None])[:, 0]
    x0 = torch.stack([x_free, x_free, left - side, right], 1).gather(1, band[:, None])[:, 0]
    # affine_grid with align_corners=False: pixel edges 0 … w map to −1 … 1
    s = side.to(images.dtype)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    sx, sy = torch.where(apply, s / w, one), torch.where(apply, s / h, one)
    cx = torch.where(apply, (2 * x0.to(images.dtype) + s) / w - 1, zero)
    cy = torch.where(apply, (2 * y0.to(images.dtype) + s) / h - 1, zero)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    cropped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    keep = apply[:, None, None, None]
    return torch.where(keep, cropped, images), torch.where(keep, torch.zeros_like(masks), masks)


def lesion_paste(
    images: torch.Tensor, masks: torch.Tensor, geometry: AugmentConfig,
    rand: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``geometry.lesion_paste`` per image of (B,1,H,W): paste a lesion of the
    batch (its bounding box plus a margin of 10 % of the side, which carries the posterior
    shadow or enhancement below it) at a uniformly random place, blended in with a linear ramp
    over the margin, and add it to the mask where the blend weight is ≥ ½. Lesions whose padded
    box covers more than a third of the image are not pasted. The place is uniform over the
    whole height, so the model sees lesions at the depths BrEaST lacks (its lesion centres sit
    at 19–45 % of the height), below whatever near field the host image has."""
    b, _, h, w = images.shape
    has = masks.flatten(1).amax(1) > 0
    donors = torch.nonzero(has).flatten().tolist()
    apply, u = rand(b) < geometry.lesion_paste, rand(b, 3)
    if not donors or not bool(apply.any()):
        return images, masks
    src_images, src_masks = images, masks  # donors as they came, not as already pasted
    images, masks = images.clone(), masks.clone()
    margin = max(2, round(0.1 * min(h, w)))
    for i in torch.nonzero(apply).flatten().tolist():
        j = donors[min(int(u[i, 0] * len(donors)), len(donors) - 1)]
        ys = torch.nonzero(src_masks[j, 0].amax(1) > 0).flatten()
        xs = torch.nonzero(src_masks[j, 0].amax(0) > 0).flatten()
        y0, y1 = max(int(ys[0]) - margin, 0), min(int(ys[-1]) + 1 + margin, h)
        x0, x1 = max(int(xs[0]) - margin, 0), min(int(xs[-1]) + 1 + margin, w)
        ph, pw = y1 - y0, x1 - x0
        if ph * pw > h * w / 3:
            continue
        ty, tx = min(int(u[i, 1] * (h - ph + 1)), h - ph), min(int(u[i, 2] * (w - pw + 1)), w - pw)
        ramp_y = torch.minimum(torch.arange(1, ph + 1), torch.arange(ph, 0, -1)) / margin
        ramp_x = torch.minimum(torch.arange(1, pw + 1), torch.arange(pw, 0, -1)) / margin
        alpha = (ramp_y.clamp(max=1)[:, None] * ramp_x.clamp(max=1)[None, :]).to(images)
        patch, patch_mask = src_images[j, 0, y0:y1, x0:x1], src_masks[j, 0, y0:y1, x0:x1]
        host = images[i, 0, ty:ty + ph, tx:tx + pw]
        images[i, 0, ty:ty + ph, tx:tx + pw] = alpha * patch + (1 - alpha) * host
        host_mask = masks[i, 0, ty:ty + ph, tx:tx + pw]
        masks[i, 0, ty:ty + ph, tx:tx + pw] = torch.where(alpha >= 0.5, patch_mask, host_mask)
    return images, masks


def lateral_roll(
    images: torch.Tensor, masks: torch.Tensor, geometry: AugmentConfig,
    rand: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``geometry.lateral_roll`` per image of (B,1,H,W): roll it (and its mask)
    sideways by k columns, k uniform in ±``lateral_roll_max`` · W; what leaves one side comes
    back on the other. BrEaST's lesion centres sit at 39–60 % of the width (5th–95th
    percentile), BUSI's at 24–76 %; a BrEaST-trained model misses many lesions off mid-width
    (``benchmarks.lesion_position``). Linear-probe frames hold tissue out to both edges, so the
    seam joins tissue to tissue, unlike a translation that fills with black. Measured (max 0.2,
    three seed pairs): BUSI +0.002 to +0.015 over the unrolled pairs, none significant alone;
    the far lesions gain, the centred ones sometimes lose (docs/external_validation.md)."""
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
    ``grid_sample`` after the optional ``negative_crop``, ``lesion_paste``, ``depth_splice`` and
    ``lateral_roll``
    (masks resampled bilinearly, then > 0.5, so they stay binary); gain 0.8–1.2, contrast
    0.85–1.15 about the image mean, gamma e^±0.3; optionally blur or unsharp masking of random
    strength up to ``sharpness`` (scanners differ in resolution and speckle size); optionally
    ``gin`` (a random shallow conv net remaps the intensities); multiplicative
    speckle-like noise (Gaussian at half resolution, upsampled, σ ≤ 0.15). Random numbers come
    from ``generator`` on its own device (CPU by default) so a seed gives the same batch whatever
    device trains."""
    b, _, h, w = images.shape
    dev, gdev = images.device, generator.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=gdev).to(dev)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=gdev).to(dev)

    if geometry.negative_crop > 0:
        images, masks = negative_crop(images, masks, geometry, rand)
    if geometry.lesion_paste > 0:
        images, masks = lesion_paste(images, masks, geometry, rand)
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
    if geometry.sharpness > 0:  # drawn last, so the draws above match a run without it
        amount = (rand(b, 1, 1, 1) * 2 - 1) * geometry.sharpness
        images = images + amount * (images - _blur1(images))  # < 0 blurs, > 0 sharpens
    if geometry.gin > 0:  # after sharpness, for the same reason
        images = gin(images.clamp(0, 1), geometry.gin, rand, randn)
    images = images * (1 + sigma * noise)
    return images.clamp_(0.0, 1.0), masks


def gin(
    images: torch.Tensor, p: float, rand: Callable[..., torch.Tensor],
    randn: Callable[..., torch.Tensor], layers: int = 4, width: int = 2,
) -> torch.Tensor:
    """GIN (Ouyang et al. 2022, single-source domain generalisation for medical segmentation):
    with probability ``p`` per image of (B,1,H,W) in [0,1], a freshly drawn shallow conv net
    (``layers`` layers of ``width`` channels, kernels of 1 or 3 px, Gaussian weights and biases,
    leaky ReLU between layers) remaps the intensities; its output, rescaled to the image's own
    [min, max] and signed to correlate positively with it (no inverted echogenicity), is mixed
    with the image by α ~ U(0, 1). Shapes stay put (masks are unchanged);
    texture and contrast become those of another "scanner". Draws a fixed count per batch."""
    b, _, h, w = images.shape
    pick, alpha = rand(b) < p, rand(b).view(b, 1, 1, 1)
    x, cin = images.reshape(1, b, h, w), 1
    for layer in range(layers):
        cout = 1 if layer == layers - 1 else width
        k = 3 if rand(1).item() < 0.5 else 1
        weight = randn(b * cout, cin, k, k).to(images.dtype) / math.sqrt(cin * k * k)
        x = F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect") if k > 1 else x, weight,
                     randn(b * cout).to(images.dtype), groups=b)
        if layer < layers - 1:
            x = F.leaky_relu(x, 0.2)
        cin = cout
    y = x.reshape(b, 1, h, w)
    # keep polarity: lesions are hypoechoic at every centre, an inverted image is no scanner's
    centred = images - images.mean((2, 3), keepdim=True)
    agree = (centred * (y - y.mean((2, 3), keepdim=True))).sum((2, 3), keepdim=True)
    y = y * torch.where(agree < 0, -1.0, 1.0)
    lo, hi = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    y_lo, y_hi = y.amin((2, 3), keepdim=True), y.amax((2, 3), keepdim=True)
    y = (y - y_lo) / (y_hi - y_lo).clamp_min(1e-6) * (hi - lo) + lo
    mixed = alpha * y + (1 - alpha) * images
    return torch.where(pick.view(b, 1, 1, 1), mixed, images)


def _blur1(images: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (B,1,H,W) with σ = 1 px (5 taps, reflected edges)."""
    taps = torch.exp(-torch.arange(-2, 3, dtype=images.dtype, device=images.device) ** 2 / 2)
    taps = taps / taps.sum()
    out = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="reflect"), taps.view(1, 1, 1, 5))
    return F.conv2d(F.pad(out, (0, 0, 2, 2), mode="reflect"), taps.view(1, 1, 5, 1))


def calm(geometry: AugmentConfig) -> AugmentConfig:
    """``geometry`` without the centre-shift transforms (splice, crop, paste, roll, stretch): what
    the last ``calm_epochs`` epochs train on, so boundaries are learnt on unaltered images."""
    return replace(geometry, depth_splice=0.0, negative_crop=0.0, lesion_paste=0.0,
                   lateral_roll=0.0, stretch=0.0)


def augmentation(augment: bool | AugmentConfig | None) -> AugmentConfig | None:
    """``augment`` argument → ranges: True means the defaults, False/None means off."""
    if isinstance(augment, AugmentConfig):
        return augment
    return AugmentConfig() if augment else None


def shrink_batch(raw: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,1,S,S) image in [0,1] and binary mask → both at side S·scale rounded to a multiple of
    32 (≥ 32, so every encoder stride divides it), by pixel-area averaging; the mask is
    re-binarised at 0.5.
    Progressive resizing (``TrainConfig.low_res_epochs``): early epochs learn at a fraction of the
    cost, and BI-RADS features are resolution-invariant, so the prior sees the same quantities."""
    side = raw.shape[-1]
    small = max(32, int(side * scale / 32 + 0.5) * 32)  # half rounds up
    if small >= side:
        return raw, mask
    raw = F.interpolate(raw, size=(small, small), mode="area")
    mask = (F.interpolate(mask.to(raw.dtype), size=(small, small), mode="area") >= 0.5).to(mask.dtype)
    return raw, mask
