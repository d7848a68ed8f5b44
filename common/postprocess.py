"""Post-processing of mask probabilities, without torch (NumPy/SciPy/Pillow only), so the predict
command runs from an ONNX file on a workstation that has no torch: the largest connected
component (``common.inference`` re-exports it for the torch path) and the mask brought back to
the image's own resolution.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def largest_component(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """probs (N,1,H,W) with every pixel outside the largest 8-connected component of
    (probs ≥ ``threshold``) set to 0, per image (ties: the component labelled first, in raster
    order); an image without foreground is left as it is. Returns a new array."""
    out = np.array(probs, copy=True)
    for i in range(out.shape[0]):
        labels, n = ndimage.label(out[i, 0] >= threshold, structure=_EIGHT)
        if n:
            biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
            out[i, 0][labels != biggest] = 0.0
    return out


def resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (H,W) → float32 (height,width), bilinear, antialiased when it shrinks: Pillow's
    filter, which torch's ``interpolate(mode="bilinear", antialias=True)`` (``to_tensors``)
    reproduces within 3e-7 on [0,1] images."""
    arr = np.ascontiguousarray(image, dtype=np.float32)
    if arr.shape == (height, width):
        return arr.copy()
    return np.asarray(Image.fromarray(arr).resize((width, height), Image.BILINEAR), dtype=np.float32)


def mask_at(probs: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """bool (height,width): the model-resolution probabilities (S,S) resized bilinearly to the
    image's own size, then ≥ ``threshold``."""
    return resize_float(probs, height, width) >= threshold
