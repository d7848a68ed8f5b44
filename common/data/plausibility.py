"""Warnings for an image/mask pair that loads but looks wrong (the site check lists them).

A tiny image is a thumbnail or an icon, not a scan; a mask over most of its image is inverted
or the wrong file; a mask equal to its image means a column points at the wrong file. None of
these is certain enough to refuse the case, so each is a warning a data manager looks at.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MIN_SIDE = 32  # px: a smaller image is warned about
MAX_MASK_SHARE = 0.5  # a mask covering more of its image is warned about


def same_file(a: str | Path, b: str | Path) -> bool:
    """Same file, or byte-identical files (sizes compared first: cheap when they differ)."""
    try:
        if os.path.samefile(a, b):
            return True
        if os.stat(a).st_size != os.stat(b).st_size:
            return False
        return Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False


def implausible_pair(image: np.ndarray, image_path: str | Path, mask: np.ndarray,
                     mask_paths: list[str | Path]) -> list[tuple[str, str, str]]:
    """(path, kind, message) per warning for uint8 (H, W) ``image`` and its merged bool (H, W)
    ``mask``: "image-small" (under ``MIN_SIDE`` px on a side), "mask-large" (over
    ``MAX_MASK_SHARE`` of the image), "mask-is-image" (the same file, or exactly the image's
    bright half: the mask column names the image, or the image column a mask)."""
    out = []
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        out.append((str(image_path), "image-small", f"image is only {w}x{h} px (under {MIN_SIDE} px on a side)"))
    share = float(mask.mean()) if mask.size else 0.0
    if share > MAX_MASK_SHARE:
        where = str(mask_paths[0]) if mask_paths else str(image_path)
        text = f"mask covers {share:.0%} of the image (over {MAX_MASK_SHARE:.0%}); inverted or the wrong file?"
        out.append((where, "mask-large", text))
    if mask.any() and (any(same_file(image_path, m) for m in mask_paths)
                       or np.array_equal(image > int(image.max()) // 2, mask)):
        out.append((str(mask_paths[0]), "mask-is-image",
                    f"mask equals its image {Path(image_path).name} (wrong file listed?)"))
    return out
