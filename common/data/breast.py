"""BrEaST-Lesions-USG (Pawłowska et al., Sci Data 2024; Poland, several scanner vendors).

Layout: ``BrEaST-Lesions_USG-images_and_masks/caseNNN.png`` (RGBA screenshots of grey scans),
``caseNNN_tumor.png`` (the lesion, white on transparent), ``caseNNN_otherK.png`` (other
findings, e.g. cysts: NOT the lesion, never merged; their count is kept as descriptor
``Other_findings``), and ``BrEaST-Lesions-USG-clinical-data-*.xlsx`` (found by glob) beside
the folder. The root may be the folder holding both, or the image folder itself.

- Label: the sheet's ``Classification`` (benign/malignant/normal); file names from
  ``Image_filename`` / ``Mask_tumor_filename`` / ``Mask_other_filename`` ('&'-joined lists),
  falling back to ``caseNNN_tumor*.png`` when the tumour cell is empty. 4 normal cases have
  no tumour mask. One scan per patient (256 scans of 256 patients): patient_id = case id.
- Descriptors: every other column (Shape, Margin, Echogenicity, Posterior_features, Halo,
  Calcifications, BIRADS, Tissue_composition, Age, Pixel_size, ...) as the sheet's text:
  '&'-joined lists and 'not available' are kept verbatim, numbers lose a spurious '.0',
  empty cells are left out.
- Spacing: ``Pixel_size`` is in centimetres per pixel (the sheet's own data dictionary says
  so; 0.0078 cm = 0.078 mm/px, i.e. 4-6 cm fields of view over 500-800 px originals). It
  describes the ORIGINAL image, whose size is recorded nowhere (not in the sheet, not in the
  PNG). A resampled copy, such as the shared one (longer side cut to 256 px), cannot be told
  apart from an original by inspection, so a default load sets ``spacing_mm=None`` rather
  than risk a wrong scale; pass ``original_resolution=True`` for an unmodified download to
  get ``spacing_mm = 10 × Pixel_size``. The raw value stays in descriptors['Pixel_size'] (cm).
"""
from __future__ import annotations

import re
from pathlib import Path

from common.data import CentreLoad, IssueLog, natural_key, resolve_duplicates, scan_folder
from common.data.io import find_column, read_table
from common.records import Case, DataError, Label

CENTRE = "BrEaST"
IMAGES_DIR = "BrEaST-Lesions_USG-images_and_masks"
XLSX_GLOB = "BrEaST-Lesions-USG-clinical-data-*.xlsx"
FILE_COLUMNS = ("CaseID", "Image_filename", "Mask_tumor_filename", "Mask_other_filename",
                "Classification")
_CASE_FILE = re.compile(r"^(?P<stem>case\d+)(?:_(?P<kind>tumor|other)\d*)?$", re.IGNORECASE)


def _locate(root: Path, log: IssueLog) -> tuple[Path, Path] | None:
    """(image folder, spreadsheet), or None with errors filed."""
    images = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    if not images.is_dir():
        log.error(root, "folder not found", "layout")
        return None
    sheets = sorted({p.resolve() for d in (root, images, images.parent) if d.is_dir()
                     for p in d.glob(XLSX_GLOB)})
    if not sheets:
        log.error(root, f"no clinical spreadsheet {XLSX_GLOB} (labels missing)", "spreadsheet")
        return None
    if len(sheets) > 1:
        log.error(root, "several clinical spreadsheets, cannot tell which holds the labels: "
                  + ", ".join(p.name for p in sheets), "spreadsheet")
        return None
    return images, sheets[0]


def _split(cell: str | None) -> list[str]:
    return [t.strip() for t in (cell or "").split("&") if t.strip()]


def load(root: Path, *, strict: bool = True, original_resolution: bool = False) -> CentreLoad:
    """Images, tumour masks and the clinical sheet → ``CentreLoad``; strict raises on errors.

    original_resolution: the PNGs are the unmodified originals, so ``Pixel_size`` applies.
    """
    root = Path(root)
    log = IssueLog(CENTRE, root)
    located = _locate(root, log)
    if located is None:
        return log.finish([], strict)
    images_dir, xlsx = located
    try:
        sheets = read_table(xlsx)
    except DataError as exc:
        log.failed(exc, xlsx)
        return log.finish([], strict)
    rows = next((r for r in sheets.values() if r and find_column(r[0], "Classification")), None)
    if rows is None:
        log.error(xlsx, "no sheet has a 'Classification' column (labels missing)", "spreadsheet")
        return log.finish([], strict)
    cols = list(rows[0])
    label_col = find_column(cols, "Classification")
    image_col, id_col = find_column(cols, "Image_filename"), find_column(cols, "CaseID")
    if image_col is None and id_col is None:
        log.error(xlsx, "neither 'Image_filename' nor 'CaseID' column: cannot match rows to "
                  "images", "spreadsheet")
        return log.finish([], strict)
    tumor_col, other_col = find_column(cols, "Mask_tumor_filename"), find_column(
        cols, "Mask_other_filename")
    skip = {find_column(cols, c) for c in FILE_COLUMNS}
    pixel_col = find_column(cols, "Pixel_size")

    on_disk = {f.name.lower(): f for f in scan_folder(images_dir, log)}
    used: set[str] = set()
    cases: list[Case] = []
    for n, row in enumerate(rows, start=2):
        where = f"{xlsx.name} row {n}"
        name = row.get(image_col) if image_col else None
        if not name and id_col and row.get(id_col) and row[id_col].isdigit():
            name = f"case{int(row[id_col]):03d}.png"
        if not name:
            log.error(xlsx, f"row {n}: no image file name", "spreadsheet")
            continue
        img = on_disk.get(name.lower())
        if img is None:
            log.error(images_dir / name, f"listed in {where} but not found", "missing-image")
            continue
        if name.lower() in used:
            log.error(xlsx, f"row {n}: {name} listed twice", "spreadsheet")
            continue
        used.add(name.lower())
        try:
            label = Label.parse(row.get(label_col) or "")  # type: ignore[arg-type]
        except ValueError as exc:
            log.error(img, f"{where}: {exc}", "label")
            continue
        tumours = _split(row.get(tumor_col)) if tumor_col else []
        if not tumours:
            tumours = [f.name for f in on_disk.values()
                       if f.stem.lower().startswith(img.stem.lower() + "_tumor")]
        others = _split(row.get(other_col)) if other_col else []
        mask_paths = []
        for m in tumours:
            used.add(m.lower())
            mask_paths.append(on_disk.get(m.lower(), images_dir / m))  # missing → read error
        for m in others:
            used.add(m.lower())
            if m.lower() not in on_disk:
                log.warning(images_dir / m, f"other-finding mask listed in {where} not found",
                            "orphan")
        descriptors = {k: v for k, v in row.items() if k not in skip and v is not None}
        if others:
            descriptors["Other_findings"] = str(len(others))
        case = log.case(img, mask_paths, label, case_id=img.stem, patient_id=img.stem,
                        spacing_mm=_spacing(row.get(pixel_col) if pixel_col else None,
                                            original_resolution, img, log),
                        descriptors=descriptors)
        if case is not None:
            cases.append(case)
    _report_unused(on_disk, used, xlsx, log)
    cases = resolve_duplicates(cases, log)
    return log.finish(cases, strict)


def _spacing(cell: str | None, original_resolution: bool, img: Path,
             log: IssueLog) -> float | None:
    """mm per pixel of the returned array (see module docstring for why None by default)."""
    if not original_resolution:
        return None
    try:
        value = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        log.warning(img, f"Pixel_size {cell!r} is not a number; spacing unknown", "spacing")
        return None
    if not 0.0 < value < 1.0:
        log.warning(img, f"Pixel_size {value} cm is implausible; spacing unknown", "spacing")
        return None
    return value * 10.0


def _report_unused(on_disk: dict[str, Path], used: set[str], xlsx: Path, log: IssueLog) -> None:
    for key, f in sorted(on_disk.items(), key=lambda kv: natural_key(kv[1])):
        if key in used:
            continue
        m = _CASE_FILE.match(f.stem)
        if m and m["kind"] is None:
            log.error(f, f"image has no row in {xlsx.name} (label missing)", "label")
        elif m and (m["stem"] + ".png").lower() not in used:
            log.warning(f, "mask without image (or image not in the spreadsheet); ignored",
                        "orphan")
        else:
            log.warning(f, f"not referenced by {xlsx.name}; ignored", "stray")
