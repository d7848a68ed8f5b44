"""The predict command's inputs and outputs (torch-free): what to predict (files, folders, a
manifest CSV), the true mask of a manifest row, the overlay picture and the atomic writes."""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from common.atomic import atomic_write
from common.data import IssueLog
from common.data.io import FileError, fit_mask, load_mask
from common.data.manifest import read_manifest
from common.prediction import InputError, read_input

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
CONTOUR_RGB = (255, 200, 0)


@dataclass
class Item:
    """One image to predict. ``masks``/``label``/``spacing_mm`` come from a manifest row;
    ``truth`` (bool (H,W)) is read by ``load_truth`` once the image's size is known."""

    path: Path
    key: str  # output file stem, unique within a run
    label: str | None = None  # benign | malignant | normal
    masks: tuple[Path, ...] = ()
    with_masks: bool = False  # the manifest has a mask column
    spacing_mm: float | None = None
    truth: np.ndarray | None = field(default=None, repr=False)

    def load_truth(self, shape: tuple[int, int]) -> None:
        """The true mask at the image's size: the OR of the row's mask files (empty for a normal
        image without one); None when unknown. InputError naming the mask file otherwise."""
        if not self.with_masks or (not self.masks and self.label != "normal"):
            self.truth = None
            return
        merged = np.zeros(shape, dtype=bool)
        for m in self.masks:
            got = read_input(m, load_mask)
            try:
                fitted, _ = fit_mask(got.mask, shape, m, self.path)
            except FileError as exc:
                raise InputError(str(exc)) from None
            merged |= fitted
        self.truth = merged


def _key(text: str, seen: set[str]) -> str:
    """File-name-safe, unique stem from a relative path ('benign/img 1' → 'benign__img_1')."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__").replace("\\", "__")).strip("._") or "image"
    key, n = base, 1
    while key in seen:
        n += 1
        key = f"{base}-{n}"
    seen.add(key)
    return key


def _manifest(path: Path, spacing: float | None, seen: set[str], errors: list[str]) -> list[Item]:
    """Items of a manifest CSV, read by the site's reader (``common.data.manifest``: the same
    columns, the same errors naming the file and the row); only the image column is required and
    a row may give neither label nor mask. ``spacing``: the default where a row gives none."""
    log = IssueLog(path.parent.name or "manifest", path)
    manifest = read_manifest(path, log, required=("image",), label_or_mask=False)
    errors += [f"{issue.path}: {issue.message}" for issue in log.issues]
    if manifest is None:
        return []
    return [Item(r.image, _key(r.case_id, seen), r.label.name.lower() if r.label is not None else None,
                 r.masks, manifest.has_mask_column, r.spacing_mm if r.spacing_mm is not None else spacing)
            for r in manifest.rows]


def gather(inputs: Sequence[Path], spacing: float | None, errors: list[str], skip: Path | None = None,
           ) -> list[Item]:
    """Items of the command's INPUTs: one manifest CSV, or image files and folders (their image
    files, recursively, sorted; hidden files and the folder ``skip``, the output, left out).
    Problems found here go to ``errors``."""
    skip = skip.resolve() if skip is not None else None
    seen: set[str] = set()
    if len(inputs) == 1 and inputs[0].suffix.lower() == ".csv" and inputs[0].is_file():
        return _manifest(inputs[0], spacing, seen, errors)
    items = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and (skip is None or not p.resolve().is_relative_to(skip)))
            if not found:
                errors.append(f"{path}: no image file in this folder")
            for p in found:
                items.append(Item(p, _key(p.relative_to(path).with_suffix("").as_posix(), seen),
                                  spacing_mm=spacing))
        else:  # read_input names what is wrong with it (missing, not regular, not an image)
            items.append(Item(path, _key(path.stem, seen), spacing_mm=spacing))
    return items


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or one without FreeType: the bitmap font
        return ImageFont.load_default()


def draw_overlay(grey: np.ndarray, mask: np.ndarray, lines: Sequence[str]) -> Image.Image:
    """RGB picture: the image (H,W) with the mask's contour, and ``lines`` of text below it."""
    h, w = grey.shape
    rgb = np.repeat(grey[..., None], 3, axis=2)
    width = max(1, round(max(h, w) / 256))  # contour visible at any resolution
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    rgb[edge] = CONTOUR_RGB
    size = max(11, min(max(w, 320), 1200) // 40)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(t, font=font) for t in lines), default=0)
    canvas = Image.new("RGB", (max(w, int(text_w) + 2 * size), h + len(lines) * (size + 6) + size), "black")
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((size, h + size // 2 + i * (size + 6)), text, fill="white", font=font)
    return canvas


def write_png(path: Path, image: np.ndarray | Image.Image) -> None:
    """PNG written atomically (a reader never sees half a file)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True, mode=None)


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and not math.isfinite(value) else value


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """CSV of ``rows`` (columns in first-seen order; NaN → empty), written atomically."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def write(fh: Any) -> None:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(columns)
        out.writerows([[_cell(r.get(c, "")) for c in columns] for r in rows])

    atomic_write(path, write, mode=None)
