"""Generic site layout: a ``manifest.csv`` listing the images, so a new hospital needs no code.

Columns (header names ignore case, spaces, '_' and '-'; ',' ';' or tab separated, BOM ok):

| column | required | meaning |
|---|---|---|
| image | yes | image path, relative to the CSV's folder (or absolute, inside it) |
| label | yes | benign / malignant / normal; empty: unknown (the row must then give a mask) |
| mask | no | lesion mask path(s), several joined by '|' (merged); empty for normal images |
| patient_id | no | patient; empty → the case id (then only identical images are grouped) |
| spacing_mm | no | mm per pixel of the image file as stored; empty → unknown |

Partial annotations: an empty mask cell on a benign or malignant row means "label only" (the
mask is unknown, ``Case.has_mask`` False); an empty label cell with a mask means "mask only"
(``Case.has_label`` False). A row with neither a mask nor a label is an error naming the row.
Any other column is kept as a descriptor. The case id is the image path relative to the CSV
without its suffix; the centre name is the CSV's folder name. ``root`` is the folder holding
``manifest.csv`` or the CSV file itself. Every image and mask path must resolve (symlinks
followed) inside the CSV's folder: a row pointing elsewhere (``..``, an outside absolute path, a
symlink out) is an error naming the row, so a manifest can never make a site read other files.
``read_manifest`` is the one parser of these rules: ``fedbus-predict`` reads its manifest INPUT
with it too (client/predict_io.py), requiring only the image column.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.data import CentreLoad, IssueLog, resolve_duplicates
from common.data.io import FileError, find_column, read_case, read_table
from common.records import Case, DataError, Label

FILENAME = "manifest.csv"
REQUIRED = ("image", "label")
OPTIONAL = ("mask", "patient_id", "spacing_mm")


@dataclass(frozen=True)
class ManifestRow:
    """One valid row, nothing read yet: paths resolved against the CSV's folder (and checked to
    stay inside it), the label parsed, the spacing a positive number or None."""

    row: int  # line of the CSV (the header is row 1)
    image_cell: str  # the image path as written: the case id comes from it
    image: Path
    masks: tuple[Path, ...]
    label: Label | None
    patient_id: str | None
    spacing_mm: float | None
    descriptors: dict[str, str] = field(default_factory=dict)  # every column not listed above

    @property
    def case_id(self) -> str:
        return Path(self.image_cell).with_suffix("").as_posix()


@dataclass(frozen=True)
class Manifest:
    path: Path
    has_mask_column: bool  # False: nothing is known about masks (not "no lesion")
    rows: tuple[ManifestRow, ...]


def _csv_path(root: Path) -> Path:
    return root if root.suffix.lower() == ".csv" else root / FILENAME


def read_manifest(csv_path: Path, log: IssueLog, required: tuple[str, ...] = REQUIRED,
                  label_or_mask: bool = True) -> Manifest | None:
    """The manifest's rows, every problem filed in ``log`` naming the file and the row; the
    site loader and ``fedbus-predict`` (client/predict_io.py) both read manifests here.
    ``required``: columns that must exist (predict needs only "image"); ``label_or_mask``: a row
    must give a label or a mask (training data). None when the file or a column is unusable."""
    csv_path = Path(csv_path)
    if not csv_path.exists():  # anything else there (a FIFO, a folder): read_table names it
        log.error(csv_path, "manifest file missing", "layout")
        return None
    try:
        rows = next(iter(read_table(csv_path).values()))
    except DataError as exc:
        log.failed(exc, csv_path)
        return None
    cols = list(rows[0]) if rows else []
    col = {name: find_column(cols, name) for name in REQUIRED + OPTIONAL}
    missing = [name for name in required if col[name] is None]
    if missing:
        log.error(csv_path, f"column(s) {', '.join(missing)} missing (found: "
                  f"{', '.join(cols) or 'no columns'})", "spreadsheet")
        return None
    known = set(col.values())
    seen: dict[Path, int] = {}
    parsed = [_row(n, row, col, known, csv_path, seen, log, label_or_mask)
              for n, row in enumerate(rows, start=2)]
    return Manifest(csv_path, col["mask"] is not None, tuple(r for r in parsed if r is not None))


def load(root: Path, *, strict: bool = True) -> CentreLoad:
    """manifest.csv → ``CentreLoad``; strict raises on any error."""
    csv_path = _csv_path(Path(root))
    log = IssueLog(csv_path.parent.name or "manifest", csv_path)
    manifest = read_manifest(csv_path, log)
    if manifest is None:
        return log.finish([], strict)
    cases = [c for c in (_case(r, log) for r in manifest.rows) if c is not None]
    return log.finish(resolve_duplicates(cases, log), strict)


def _row(n: int, row: dict[str, str | None], col: dict[str, str | None], known: set[str | None],
         csv_path: Path, seen: dict[Path, int], log: IssueLog, label_or_mask: bool) -> ManifestRow | None:
    def cell(name: str) -> str | None:
        return row.get(col[name]) if col[name] else None  # type: ignore[arg-type]

    base, where = csv_path.parent, f"{csv_path.name} row {n}"
    image = cell("image")
    if not image:
        log.error(csv_path, f"row {n}: empty image path", "spreadsheet")
        return None
    img = base / image
    masks = tuple(base / m.strip() for m in (cell("mask") or "").split("|") if m.strip())
    outside = [str(p) for p in (img, *masks) if not _inside(p, base)]
    if outside:
        log.error(csv_path, f"row {n}: path(s) {', '.join(outside)} lie outside the manifest's "
                  f"folder {base}; refused", "path-outside")
        return None
    if img in seen:
        log.error(csv_path, f"row {n}: {image} listed again (first in row {seen[img]})",
                  "spreadsheet")
        return None
    seen[img] = n
    label: Label | None = None
    if cell("label"):
        try:
            label = Label.parse(cell("label") or "")
        except ValueError as exc:
            log.error(img, f"{where}: {exc}", "label")
            return None
    elif label_or_mask and not masks:
        log.error(img, f"{where}: neither a mask nor a label; give at least one", "label")
        return None
    try:
        spacing = _spacing(cell("spacing_mm"))
    except ValueError:
        log.error(img, f"{where}: spacing_mm {cell('spacing_mm')!r} is not a positive number",
                  "spreadsheet")
        return None
    descriptors = {k: v for k, v in row.items() if k not in known and v}
    return ManifestRow(n, image, img, masks, label, cell("patient_id") or None, spacing, descriptors)


def _case(row: ManifestRow, log: IssueLog) -> Case | None:
    """A row's images read into a ``Case`` (errors filed in ``log``)."""
    fields = {"case_id": row.case_id, "patient_id": row.patient_id or row.case_id,
              "spacing_mm": row.spacing_mm, "descriptors": row.descriptors}
    img, masks = row.image, list(row.masks)
    if row.label is None:
        return _mask_only(img, masks, log, fields)
    if not masks and row.label != Label.NORMAL:  # label only: read the image as if normal
        case = log.case(img, [], Label.NORMAL, **fields)
        return None if case is None else dataclasses.replace(case, label=row.label, has_mask=False)
    return log.case(img, masks, row.label, **fields)


def _mask_only(img: Path, masks: list[Path], log: IssueLog, fields: dict[str, object]) -> Case | None:
    """A row with a mask and no label: read as benign (a lesion), or as normal when the mask
    is empty; the label is a placeholder (``has_label`` False)."""
    try:
        case, notes = read_case(img, list(masks), Label.BENIGN, centre=log.centre, **fields)
    except FileError as exc:
        if exc.kind != "mask-empty":
            log.failed(exc, img)
            return None
        case = log.case(img, masks, Label.NORMAL, **fields)
        return None if case is None else dataclasses.replace(case, has_label=False)
    except DataError as exc:
        log.failed(exc, img)
        return None
    log.notes(notes)
    return dataclasses.replace(case, has_label=False)


def _inside(path: Path, base: Path) -> bool:
    """Does ``path`` resolve (symlinks followed, '..' applied) inside ``base``?"""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _spacing(text: str | None) -> float | None:
    """'' → None (unknown); '0.1' → 0.1; anything else → ValueError."""
    if not text:
        return None
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value
