"""Decoded, resized tensors in memory, batched augmentation, and an on-disk cache.

Design: every image is decoded and resized once into one (N,1,S,S) tensor, so the data path during
training is indexing plus one batched augmentation call on the training device; the loader can
never be the bottleneck. Sites keep the tensors on disk (``cached_tensors``) because Flower starts
a new process per message and must not re-decode PNGs every round.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.records import Case

log = logging.getLogger(__name__)


@dataclass
class TensorData:
    """A centre's (or a split's) cases as tensors. S = image side.

    images: float32 (N,1,S,S) in [0,1]; masks: float32 (N,1,S,S) in {0,1}; malignant: float32 (N,);
    labels: int64 (N,) Label values; has_lesion: bool (N,); spacing_mm: float32 (N,), NaN unknown.
    """

    images: torch.Tensor
    masks: torch.Tensor
    malignant: torch.Tensor
    labels: torch.Tensor
    has_lesion: torch.Tensor
    spacing_mm: torch.Tensor
    case_ids: list[str]
    centres: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "TensorData":
        index = torch.as_tensor(idx, dtype=torch.long)
        picks = index.tolist()
        return TensorData(
            images=self.images[index],
            masks=self.masks[index],
            malignant=self.malignant[index],
            labels=self.labels[index],
            has_lesion=self.has_lesion[index],
            spacing_mm=self.spacing_mm[index],
            case_ids=[self.case_ids[i] for i in picks],
            centres=[self.centres[i] for i in picks],
        )

    def to(self, device: torch.device | str) -> "TensorData":
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return TensorData(**moved)

    def fingerprint(self) -> str:
        """Cheap content hash: shapes, ids, labels and a strided sample of pixels."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update("\x00".join(self.case_ids).encode())
        h.update(self.labels.cpu().numpy().tobytes())
        flat = self.images.reshape(-1)
        step = max(1, flat.numel() // 65536)
        h.update(flat[::step].cpu().numpy().tobytes())
        h.update(self.masks.reshape(-1)[::step].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @staticmethod
    def concat(parts: Sequence["TensorData"]) -> "TensorData":
        """Pool several centres (all at the same size) into one dataset."""
        return TensorData(
            images=torch.cat([p.images for p in parts]),
            masks=torch.cat([p.masks for p in parts]),
            malignant=torch.cat([p.malignant for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            has_lesion=torch.cat([p.has_lesion for p in parts]),
            spacing_mm=torch.cat([p.spacing_mm for p in parts]),
            case_ids=[c for p in parts for c in p.case_ids],
            centres=[c for p in parts for c in p.centres],
        )


def _resize_case(case: Case, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-frame resize to size×size: image bilinear with antialias; mask by area-average then
    ≥0.5, which keeps thin structures better than nearest when shrinking. The aspect ratio of
    non-square frames changes; the network sees every centre the same way."""
    img = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32) / 255.0)[None, None]
    msk = torch.from_numpy(np.ascontiguousarray(case.mask, dtype=np.float32))[None, None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    msk = F.interpolate(msk, size=(size, size), mode="area") >= 0.5
    if case.mask.any() and not msk.any():  # a tiny lesion vanished: keep its most covered pixel
        soft = F.interpolate(
            torch.from_numpy(case.mask.astype(np.float32))[None, None], size=(size, size), mode="area"
        )
        msk = soft >= soft.max()
    return img[0].clamp_(0.0, 1.0), msk[0].float()


def to_tensors(cases: Sequence[Case], size: int) -> TensorData:
    """Decode-once conversion. spacing_mm is rescaled to the new grid along the width
    (spacing_out = spacing_in · W_in / size); for non-square frames rows are scaled differently,
    which we accept (the area feature in mm² is reported, not used by the prior)."""
    if not cases:
        raise ValueError("to_tensors: no cases")
    imgs, msks = zip(*(_resize_case(c, size) for c in cases))
    spacing = [
        (c.spacing_mm * c.image.shape[1] / size) if c.spacing_mm else math.nan for c in cases
    ]
    labels = torch.tensor([int(c.label) for c in cases], dtype=torch.long)
    masks = torch.stack(msks)
    return TensorData(
        images=torch.stack(imgs),
        masks=masks,
        malignant=torch.tensor([c.malignant for c in cases], dtype=torch.float32),
        labels=labels,
        has_lesion=masks.flatten(1).amax(1) > 0,
        spacing_mm=torch.tensor(spacing, dtype=torch.float32),
        case_ids=[c.case_id for c in cases],
        centres=[c.centre for c in cases],
    )


def normalise(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image z-score (B,C,S,S): removes centre gain/offset differences from the model input."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True)
    return (images - mean) / (std + eps)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched augmentation on the batch's device: horizontal flip (never vertical: depth and
    posterior shadowing have a direction), small affine (±10°, scale 0.9–1.1, shift ±5%),
    gain/contrast/gamma jitter and multiplicative speckle. Random numbers come from the CPU
    ``generator`` so results are deterministic whatever the device. Masks stay binary."""
    b, dev = images.shape[0], images.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    flip = rand(b) < 0.5
    angle = (rand(b) * 2 - 1) * math.radians(10)
    scale = 0.9 + rand(b) * 0.2
    shift = (rand(b, 2) * 2 - 1) * 0.1  # affine_grid units: 0.1 = 5% of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sx = torch.where(flip, -1.0, 1.0)
    theta = torch.stack(
        [torch.stack([cos * sx, -sin, shift[:, 0]], 1), torch.stack([sin * sx, cos, shift[:, 1]], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()

    gamma = torch.exp((rand(b, 1, 1, 1) * 2 - 1) * 0.3)
    gain = 0.8 + rand(b, 1, 1, 1) * 0.4
    offset = (rand(b, 1, 1, 1) * 2 - 1) * 0.05
    speckle_level = rand(b, 1, 1, 1) * 0.15
    noise = torch.randn(images.shape, generator=generator).to(dev)
    images = images.clamp(0, 1).pow(gamma) * gain + offset
    images = images * (1 + speckle_level * noise)
    return images.clamp_(0.0, 1.0), masks


def batches(
    data: TensorData,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    augment: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batch dicts: image (normalised model input), raw ([0,1] after augmentation), mask,
    malignant, has_lesion, spacing_mm, index. Never yields an empty batch."""
    n = len(data)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    dev = torch.device(device) if device is not None else data.images.device
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) == 0 or (drop_last and len(idx) < batch_size):
            break
        raw = data.images[idx].to(dev, non_blocking=True)
        mask = data.masks[idx].to(dev, non_blocking=True)
        if augment:
            raw, mask = augment_batch(raw, mask, gen)
        yield {
            "image": normalise(raw),
            "raw": raw,
            "mask": mask,
            "malignant": data.malignant[idx].to(dev),
            "has_lesion": mask.flatten(1).amax(1) > 0,
            "spacing_mm": data.spacing_mm[idx].to(dev),
            "index": idx,
        }


def cached_tensors(
    load_cases: Callable[[], Sequence[Case]], size: int, cache_dir: str | Path, key: str
) -> TensorData:
    """TensorData from ``cache_dir/<key>-<size>.pt`` when present, else decode via ``load_cases``
    and write the cache atomically. A corrupt cache file is rebuilt with a warning."""
    cache_dir = Path(cache_dir)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    path = cache_dir / f"{safe}-{size}.pt"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
            return TensorData(**payload)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
            log.warning("cache %s is unreadable (%s); rebuilding", path, exc)
    data = to_tensors(list(load_cases()), size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({f.name: getattr(data, f.name) for f in fields(data)}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data
