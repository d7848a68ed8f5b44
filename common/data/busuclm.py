"""BUS-UCLM (Vallez et al., Sci Data 2025; Ciudad Real, Siemens ACUSON S2000).

Layout: ``images/NAME.png``, ``masks/NAME.png`` (same name), ``INFO.csv`` (UTF-8 with BOM,
';'-separated; columns Image, Resolution, Label, Doppler, Marks, Combined).

- Label: INFO.csv ``Label`` (Benign/Malignant/Normal). The mask colour encodes the class too
  (verified on the data: all 174 benign masks pure green (0,255,0), all 90 malignant pure red
  (255,0,0), normal masks black); a mask whose colour disagrees with INFO.csv is an error,
  a colour that is neither green- nor red-dominant a warning (INFO.csv wins).
- Normal images: black mask, or no mask file at all.
- Patient: the file-name prefix (``ALWI_000`` → ``ALWI``).
- Doppler, Marks, Combined and Resolution are kept as descriptors (text as published).
- Known quirks of the published data: the 13 ``HESN_*`` images have other heights than their
  masks (and than the 856x606 in INFO.csv) at the same width, so the mask cannot be placed;
  for the 9 normal ones the empty mask is simply resized (warning), the 4 benign ones
  (HESN_002..005) are errors, so a strict load fails; strict=False gives 170/90/419.
  Four images are identical across two patient prefixes (CHCO_000..003 = CHVI_005/008/009/
  013, same labels): kept, warned, and split together.
- Spacing: not published → None.
"""
from __future__ import annotations

from pathlib import Path

from common.data import CentreLoad, IssueLog, assemble_case, resolve_duplicates, scan_folder
from common.data.io import FileError, find_column, load_colour_mask, read_grey, read_table
from common.records import Case, DataError, Label

CENTRE = "BUS-UCLM"
INFO = "INFO.csv"
DESCRIPTOR_COLUMNS = ("Resolution", "Doppler", "Marks", "Combined")


def colour_class(rgb: tuple[int, int, int]) -> Label | None:
    """Green-dominant → benign, red-dominant → malignant, anything else → None."""
    r, g, b = rgb
    if g > 2 * max(r, b):
        return Label.BENIGN
    if r > 2 * max(g, b):
        return Label.MALIGNANT
    return None


def _read_info(path: Path, log: IssueLog) -> dict[str, tuple[int, dict[str, str | None]]] | None:
    """INFO.csv → {image stem (lower case): (row number, row)}; None (error filed) if unusable."""
    try:
        rows = next(iter(read_table(path).values()))
    except DataError as exc:
        log.failed(exc, path)
        return None
    columns = list(rows[0]) if rows else []
    image_col, label_col = find_column(columns, "Image"), find_column(columns, "Label")
    missing = [n for n, c in (("Image", image_col), ("Label", label_col)) if c is None]
    if missing:
        log.error(path, f"column(s) {', '.join(missing)} missing (found: {', '.join(columns)})",
                  "spreadsheet")
        return None
    table: dict[str, tuple[int, dict[str, str | None]]] = {}
    for n, row in enumerate(rows, start=2):
        name = row[image_col]  # type: ignore[index]
        if not name:
            log.error(path, f"row {n}: empty {image_col}", "spreadsheet")
            continue
        key = Path(name).stem.lower()
        if key in table:
            log.error(path, f"row {n}: {name} listed again (first in row {table[key][0]})",
                      "spreadsheet")
            continue
        table[key] = (n, {**row, "__label__": row[label_col]})  # type: ignore[index]
    return table


def load(root: Path, *, strict: bool = True) -> CentreLoad:
    """images/ + masks/ + INFO.csv → ``CentreLoad``; strict raises on any error."""
    root = Path(root)
    log = IssueLog(CENTRE, root)
    images_dir, masks_dir, info = root / "images", root / "masks", root / INFO
    for need in (images_dir, masks_dir):
        if not need.is_dir():
            log.error(need, "folder missing", "layout")
    if not info.is_file():
        log.error(info, "label file missing", "spreadsheet")
    if log.issues:
        return log.finish([], strict)
    table = _read_info(info, log)
    if table is None:
        return log.finish([], strict)
    masks = {f.stem.lower(): f for f in scan_folder(masks_dir, log)}
    seen: set[str] = set()
    cases: list[Case] = []
    for img in scan_folder(images_dir, log):
        key = img.stem.lower()
        seen.add(key)
        entry = table.get(key)
        if entry is None:
            log.error(img, f"no row in {info} (label missing)", "label")
            continue
        case = _case(img, masks.get(key), entry, info, log)
        if case is not None:
            cases.append(case)
    for key, f in masks.items():
        if key not in seen:
            log.warning(f, "mask without image; ignored", "orphan")
    for key, (n, row) in table.items():
        if key not in seen:
            log.warning(info, f"row {n}: no image {key}.png in {images_dir}; row ignored",
                        "orphan")
    cases = resolve_duplicates(cases, log)
    return log.finish(cases, strict)


def _case(img: Path, mask_path: Path | None, entry: tuple[int, dict[str, str | None]],
          info: Path, log: IssueLog) -> Case | None:
    n, row = entry
    try:
        label = Label.parse(row["__label__"] or "")
    except ValueError as exc:
        log.error(info, f"row {n} ({img.name}): {exc}", "label")
        return None
    try:
        image = read_grey(img)
        masks = []
        if mask_path is not None:
            got, colours = load_colour_mask(mask_path)
            _check_colours(mask_path, colours, label, log)
            masks.append((mask_path, got))
        descriptors = {c: row[c] for c in DESCRIPTOR_COLUMNS if row.get(c)}
        case, notes = assemble_case(image, img, masks, label, case_id=img.stem,
                                    patient_id=img.stem.split("_")[0], centre=CENTRE,
                                    descriptors=descriptors)  # type: ignore[arg-type]
    except DataError as exc:
        log.failed(exc, img)
        return None
    log.notes(notes)
    return case


def _check_colours(path: Path, colours: set[tuple[int, int, int]], label: Label,
                   log: IssueLog) -> None:
    """The colour is the class: disagreement with INFO.csv is an error (which one is right?)."""
    classes = {colour_class(c) for c in colours}
    known = classes - {None}
    if len(known) > 1:
        raise FileError(path, "mask has both benign (green) and malignant (red) colours",
                        kind="label")
    if known and label != Label.NORMAL and known != {label}:
        (got,) = known
        raise FileError(path, f"mask colour says {got.name.lower()} but INFO.csv says "
                        f"{label.name.lower()}", kind="label")
    if None in classes and colours:
        odd = sorted(c for c in colours if colour_class(c) is None)[:3]
        log.warning(path, f"mask colours {odd} are neither green nor red; label taken from "
                    "INFO.csv", "mask-colour")
