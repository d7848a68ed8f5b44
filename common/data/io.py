"""Pixel readers shared by every centre loader: files in, plain numpy arrays out.

Published datasets store the same thing in many ways (RGBA screenshots of grey scans, mode '1'
masks, white-on-transparent masks, colour-coded masks, 16-bit PNGs), so these readers settle it
once: images become uint8 (H, W) grey, masks become bool (H, W). Every failure raises
``DataError`` whose message starts with the offending file.
"""
from __future__ import annotations

import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data.plausibility import implausible_pair
from common.records import Case, DataError, Label

log = logging.getLogger(__name__)

PathLike = str | Path

#: Largest image accepted, in pixels (W × H): ultrasound frames are ~1 Mpx, and a header claiming
#: more (a decompression bomb) would exhaust memory before any check on the pixels could run.
MAX_PIXELS = 50_000_000


class FileError(DataError):
    """A ``DataError`` about one file; ``path`` and ``kind`` let loaders file it as an Issue.

    kind: "unreadable", "mask-missing", "mask-empty", "mask-size", "label", ...
    """

    def __init__(self, path: PathLike, text: str, kind: str = "unreadable") -> None:
        super().__init__(f"{path}: {text}")
        self.path, self.text, self.kind = str(path), text, kind


@dataclass(frozen=True)
class Note:
    """A warning about one file, for the loader to record as an Issue."""

    path: str
    kind: str
    message: str


def check_regular(path: PathLike) -> None:
    """``FileError`` unless ``path`` is a regular file (after symlinks), checked with ``stat``
    before anything opens it: opening a FIFO blocks forever, a device or folder is no image."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileError(path, "file not found") from None
    except OSError as exc:
        raise FileError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        what = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO"
                if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special")
        raise FileError(path, f"not a regular file ({what}); refused", kind="not-regular")


def _open(path: PathLike) -> Image.Image:
    """Open and fully decode (so truncation shows up here, not later). Only regular files are
    opened, and the header's size is checked against ``MAX_PIXELS`` before any pixel is decoded."""
    check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise FileError(path, f"refused, too many pixels: the image claims {w}x{h} "
                                    f"(over {MAX_PIXELS}), a possible decompression bomb", kind="bomb")
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise FileError(path, "file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FileError(path, f"refused, too many pixels, a possible decompression bomb ({exc})",
                        kind="bomb") from None
    except UnidentifiedImageError:
        raise FileError(path, "not a readable image") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        if isinstance(exc, FileError):
            raise
        raise FileError(path, f"cannot decode image ({exc})") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Wider than 8 bit: values already within 0..255 are kept, otherwise max is scaled to 255."""
    if arr.dtype == np.uint8:
        return arr
    arr = np.asarray(arr, dtype=np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    arr = np.clip(arr, 0.0, None)
    top = float(arr.max()) if arr.size else 0.0
    if top > 255.0:
        arr = arr * (255.0 / top)
    return np.rint(arr).astype(np.uint8)


def read_grey(path: PathLike) -> np.ndarray:
    """Image → uint8 (H, W) grey. Colour → ITU-R 601 luma; alpha is ignored (not a mask)."""
    im = _open(path)
    mode = im.mode
    if mode in ("LA", "La"):
        im = im.getchannel(0)
    elif mode in ("1", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB").convert("L")  # RGBA → RGB drops alpha without compositing
    arr = _to_uint8(np.asarray(im))
    if arr.ndim != 2:
        raise FileError(path, f"unexpected image shape {arr.shape} (mode {mode})")
    return np.ascontiguousarray(arr)


def _channel_max(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (H, W) brightest channel (a red or green outline counts fully)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _mask_rgb_levels(path: PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask file → (levels uint8 (H, W), rgb uint8 (H, W, 3) or None for grey files).

    RGBA/LA masks are composited on black (value × alpha): BrEaST stores white-on-transparent
    masks, BUSI opaque ones, and both come out right.
    """
    im = _open(path)
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        return (la[..., 0] * la[..., 1] // 255).astype(np.uint8), None
    if im.mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] // 255).astype(np.uint8)
        return _channel_max(rgb), rgb
    if im.mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(im.convert("RGB"))
        return _channel_max(rgb), rgb
    if im.mode == "1":
        return np.asarray(im.convert("L")), None
    arr = _to_uint8(np.asarray(im))
    if arr.ndim != 2:
        raise FileError(path, f"unexpected mask shape {arr.shape} (mode {mode})")
    return arr, None


@dataclass(frozen=True)
class MaskFile:
    """A decoded mask. levels: distinct non-zero values seen (1 for a clean binary mask);
    below: non-zero pixels that thresholding at half the maximum turned off."""

    mask: np.ndarray
    levels: int
    below: int = 0

    @property
    def binary(self) -> bool:
        return self.levels <= 1


def _binarise(levels: np.ndarray) -> MaskFile:
    """Binary files: any non-zero → True. Several grey levels (interpolated): > half of max."""
    hist = np.bincount(levels.ravel(), minlength=256)
    nonzero = np.flatnonzero(hist[1:]) + 1
    if nonzero.size <= 1:
        return MaskFile(levels > 0, int(nonzero.size))
    cut = int(nonzero[-1]) // 2  # keep values > max/2
    return MaskFile(levels > cut, int(nonzero.size), int(hist[1:cut + 1].sum()))


def load_mask(path: PathLike) -> MaskFile:
    """Mask file → ``MaskFile`` (bool (H, W) plus how many grey levels it had)."""
    levels, _ = _mask_rgb_levels(path)
    return _binarise(levels)


def read_mask(path: PathLike) -> np.ndarray:
    """Mask file → bool (H, W); non-binary masks are thresholded at half their maximum."""
    got = load_mask(path)
    if not got.binary:
        log.warning("%s: mask is not binary (%d grey levels); thresholded at half its maximum",
                    path, got.levels)
    return got.mask


def load_colour_mask(path: PathLike) -> tuple[MaskFile, set[tuple[int, int, int]]]:
    """Colour-coded mask → (``MaskFile``, set of RGB colours under the mask)."""
    levels, rgb = _mask_rgb_levels(path)
    got = _binarise(levels)
    mask = got.mask
    if rgb is None:
        rgb = np.repeat(levels[..., None], 3, axis=2)
    px = rgb[mask].astype(np.uint32)
    packed = np.unique((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2])
    colours = {(int(v >> 16), int((v >> 8) & 255), int(v & 255)) for v in packed}
    return got, colours


def read_colour_mask(path: PathLike) -> tuple[np.ndarray, set[tuple[int, int, int]]]:
    """Colour-coded mask → (bool (H, W), set of RGB colours found under the mask).

    Grey files report their grey level as (v, v, v). Used where the colour is the class
    (BUS-UCLM: green benign, red malignant).
    """
    got, colours = load_colour_mask(path)
    return got.mask, colours


def _aspect_agrees(mask_hw: tuple[int, int], image_hw: tuple[int, int]) -> bool:
    """Would scaling the mask by the width ratio give the image height (±1 px rounding)?"""
    (mh, mw), (ih, iw) = mask_hw, image_hw
    tol = max(1.0, 0.01 * max(ih, iw))
    return abs(mh * iw / mw - ih) <= tol and abs(mw * ih / mh - iw) <= tol


def fit_mask(mask: np.ndarray, image_shape: tuple[int, int], mask_path: PathLike,
             image_path: PathLike) -> tuple[np.ndarray, str | None]:
    """Bring a mask to its image's size. Returns (mask, warning text or None).

    Same aspect ratio (one of the pair was rescaled): nearest-neighbour resize, with a warning.
    Empty mask: an empty mask of the image's size, with a warning. Different aspect ratio with a
    lesion drawn: the geometry (crop? pad? stretch?) is unknown, so this raises ``DataError``
    rather than training on a misplaced outline.
    """
    if mask.shape == tuple(image_shape):
        return mask, None
    what = (f"mask {Path(mask_path).name} is {mask.shape[1]}x{mask.shape[0]} but image "
            f"{Path(image_path).name} is {image_shape[1]}x{image_shape[0]} (WxH)")
    if not mask.any():
        return np.zeros(image_shape, dtype=bool), f"{what}; mask is empty, used an empty mask"
    if not _aspect_agrees(mask.shape, image_shape):
        raise FileError(mask_path, f"{what}, with a different aspect ratio; the mask cannot be "
                        "aligned to the image", kind="mask-size")
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (image_shape[1], image_shape[0]), Image.NEAREST)
    return np.asarray(resized) > 0, f"{what}; mask resized (nearest neighbour)"


def assemble_case(image: np.ndarray, image_path: PathLike, masks: list[tuple[PathLike, MaskFile]],
                  label: Label, *, case_id: str, patient_id: str, centre: str,
                  spacing_mm: float | None = None,
                  descriptors: dict[str, str] | None = None) -> tuple[Case, list[Note]]:
    """Decoded image + decoded masks → (``Case``, warnings). Masks are merged by logical OR.

    Raises ``FileError`` when the pair cannot make a correct case: a lesion image without a
    mask or with an empty one, a normal image whose mask marks a lesion, unalignable sizes.
    """
    notes: list[Note] = []
    merged = np.zeros(image.shape, dtype=bool)
    for mpath, got in masks:
        if not got.binary:
            notes.append(Note(str(mpath), "mask-nonbinary",
                              f"mask is not binary ({got.levels} non-zero grey levels); "
                              f"thresholded at half its maximum ({got.below} px turned off)"))
        fitted, warn = fit_mask(got.mask, image.shape, mpath, image_path)
        if warn:
            notes.append(Note(str(mpath), "mask-size", warn))
        merged |= fitted
    notes += [Note(*w) for w in implausible_pair(image, image_path, merged, [p for p, _ in masks])]
    if label != Label.NORMAL:
        if not masks:
            raise FileError(image_path, f"{label.name.lower()} image has no mask file",
                            kind="mask-missing")
        if not merged.any():
            raise FileError(masks[0][0], f"mask is empty but the image is labelled "
                            f"{label.name.lower()}", kind="mask-empty")
    elif merged.any():
        raise FileError(masks[0][0], "image is labelled normal but its mask marks a lesion",
                        kind="label")
    case = Case(image=image, mask=merged, label=label, case_id=case_id, patient_id=patient_id,
                centre=centre, spacing_mm=spacing_mm, descriptors=dict(descriptors or {}),
                source=str(image_path))
    return case, notes


def read_case(image_path: PathLike, mask_paths: list[PathLike], label: Label,
              **case_fields: object) -> tuple[Case, list[Note]]:
    """Read an image and its mask files (any number, OR-merged) → (``Case``, warnings)."""
    image = read_grey(image_path)
    masks = [(p, load_mask(p)) for p in mask_paths]
    return assemble_case(image, image_path, masks, label, **case_fields)  # type: ignore[arg-type]


def read_table(path: PathLike) -> dict[str, list[dict[str, str | None]]]:
    """CSV (any BOM, ';' ',' or tab separated) or xlsx → {sheet name: rows as {column: text}}.

    Cells become stripped text (None when empty); numbers lose a spurious '.0' (3.0 → '3').
    A CSV has one sheet named after the file.
    """
    p = Path(path)
    check_regular(p)
    try:
        if p.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            import pandas as pd

            sheets = pd.read_excel(p, sheet_name=None, dtype=object, header=0)
            return {str(name): [{str(k).strip(): cell_text(v) for k, v in row.items()}
                                for row in df.to_dict("records")]
                    for name, df in sheets.items()}
        return {p.name: _read_csv(p)}
    except FileNotFoundError:
        raise FileError(p, "file not found") from None
    except FileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is a malformed file
        raise FileError(p, f"cannot read table ({type(exc).__name__}: {exc})") from None


def _read_csv(p: Path) -> list[dict[str, str | None]]:
    import csv

    text = p.read_bytes().decode("utf-8-sig", errors="replace")
    lines = text.splitlines()
    if not lines:
        raise FileError(p, "empty table")
    header = lines[0]
    sep = max((";", ",", "\t"), key=header.count)
    reader = csv.reader(lines, delimiter=sep)
    columns = [c.strip() for c in next(reader)]
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        values = values + [""] * (len(columns) - len(values))
        rows.append({c: cell_text(v) for c, v in zip(columns, values)})
    return rows


def cell_text(value: object) -> str | None:
    """A spreadsheet cell as stripped text; None for empty/NaN; 3.0 → '3'."""
    if value is None:
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def find_column(columns: object, *names: str) -> str | None:
    """The first column matching one of names, ignoring case, spaces, '_' and '-'."""
    def squash(s: str) -> str:
        return "".join(ch for ch in str(s).lower() if ch not in " _-")

    by_key = {squash(c): c for c in columns}  # type: ignore[union-attr]
    for name in names:
        if squash(name) in by_key:
            return by_key[squash(name)]
    return None
