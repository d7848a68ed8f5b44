"""UDIAT Dataset B (Yap et al., IEEE JBHI 2018; UDIAT Diagnostic Centre, Sabadell).

Not in the shared data (its owners distribute it on request); written from the published
layout: ``original/000001.png``, ``GT/000001.png`` (same names; binary lesion masks) and
``DatasetB.xlsx`` with one row per image: ``Image`` (the number, e.g. 1 or '000001'), ``Type``
('Benign'/'Malignant'), and further columns (histology) kept as descriptors.

- Matching is tolerant: the image column may be spelled Image/Image name/Filename/ID, numbers
  match zero-padded names (1 ↔ 000001.png), labels ignore case and whitespace. A sheet
  without ``Type`` is an error naming the spreadsheet.
- Every image is a lesion (163: 110 benign, 53 malignant), so an image without a GT file is
  an error. No patient ids are published: patient_id = case id (shared within a duplicate
  group). No pixel spacing is published: spacing_mm = None.
"""
from __future__ import annotations

from pathlib import Path

from common.data import CentreLoad, IssueLog, resolve_duplicates, scan_folder
from common.data.io import find_column, read_table
from common.records import Case, DataError, Label

CENTRE = "UDIAT"
SHEET = "DatasetB.xlsx"
IMAGE_COLUMNS = ("Image", "Image name", "Image_name", "Image_filename", "Filename", "File",
                 "Name", "ID")
TYPE_COLUMNS = ("Type",)


def image_key(name: object) -> str:
    """'000001.png', '1', 1, ' 000001 ' → '1'; other names → their lower-case stem."""
    text = Path(str(name).strip()).stem if str(name).strip() else ""
    return str(int(text)) if text.isdigit() else text.lower()


def _sheet(path: Path, log: IssueLog) -> dict[str, tuple[int, dict[str, str | None]]] | None:
    """DatasetB.xlsx → {image key: (row number, row with '__type__')}; None when unusable."""
    try:
        sheets = read_table(path)
    except DataError as exc:
        log.failed(exc, path)
        return None
    rows = next((r for r in sheets.values() if r), [])
    cols = list(rows[0]) if rows else []
    image_col, type_col = find_column(cols, *IMAGE_COLUMNS), find_column(cols, *TYPE_COLUMNS)
    if type_col is None or image_col is None:
        missing = "Type" if type_col is None else "Image"
        log.error(path, f"column '{missing}' missing (found: {', '.join(cols) or 'no columns'})",
                  "spreadsheet")
        return None
    table: dict[str, tuple[int, dict[str, str | None]]] = {}
    for n, row in enumerate(rows, start=2):
        key = image_key(row.get(image_col) or "")
        if not key:
            log.error(path, f"row {n}: empty {image_col}", "spreadsheet")
            continue
        if key in table:
            log.error(path, f"row {n}: image {row[image_col]} listed again (first in row "
                      f"{table[key][0]})", "spreadsheet")
            continue
        descriptors = {k: v for k, v in row.items() if k not in (image_col, type_col) and v}
        table[key] = (n, {"__type__": row.get(type_col), **descriptors})
    return table


def load(root: Path, *, strict: bool = True) -> CentreLoad:
    """original/ + GT/ + DatasetB.xlsx → ``CentreLoad``; strict raises on any error."""
    root = Path(root)
    log = IssueLog(CENTRE, root)
    images_dir, gt_dir, sheet = root / "original", root / "GT", root / SHEET
    if not sheet.is_file():
        found = sorted(root.glob("*.xlsx")) if root.is_dir() else []
        sheet = found[0] if len(found) == 1 else sheet
    for need in (images_dir, gt_dir):
        if not need.is_dir():
            log.error(need, "folder missing", "layout")
    if not sheet.is_file():
        log.error(sheet, "label spreadsheet missing", "spreadsheet")
    if log.issues:
        return log.finish([], strict)
    table = _sheet(sheet, log)
    if table is None:
        return log.finish([], strict)
    masks = {image_key(f.name): f for f in scan_folder(gt_dir, log)}
    seen: set[str] = set()
    cases: list[Case] = []
    for img in scan_folder(images_dir, log):
        key = image_key(img.name)
        seen.add(key)
        entry = table.get(key)
        if entry is None:
            log.error(img, f"no row in {sheet.name} (label missing)", "label")
            continue
        n, row = entry
        try:
            label = Label.parse(row["__type__"] or "")
        except ValueError as exc:
            log.error(sheet, f"row {n} ({img.name}): {exc}", "label")
            continue
        descriptors = {k: v for k, v in row.items() if k != "__type__" and v}
        mask = [masks[key]] if key in masks else []
        case = log.case(img, mask, label, case_id=img.stem, patient_id=img.stem,
                        descriptors=descriptors)
        if case is not None:
            cases.append(case)
    for key, f in masks.items():
        if key not in seen:
            log.warning(f, "mask without image; ignored", "orphan")
    for key, (n, _) in table.items():
        if key not in seen:
            log.warning(sheet, f"row {n}: no image for {key} in {images_dir}; row ignored",
                        "orphan")
    cases = resolve_duplicates(cases, log, merge_patients=True)
    return log.finish(cases, strict)
