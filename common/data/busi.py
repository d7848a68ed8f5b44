"""BUSI (Al-Dhabyani et al., Data in Brief 2020; Baheya hospital, Cairo).

Layout: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/NAME (k).png`` with one or more masks
``NAME (k)_mask.png``, ``NAME (k)_mask_1.png`` ... (mode '1', L, RGB or RGBA). The root may be
the folder holding ``Dataset_BUSI_with_GT`` or that folder itself.

- Label: the class folder. Several masks of one image are merged (logical OR).
- Normal images: empty mask (their mask file is black, or absent).
- No patient ids are published: patient_id is the case id, shared within a duplicate group.
- Duplicates: one image (``benign (433)`` = ``malignant (145)``) is filed under both classes.
  Which label is right is unknown, so every member of a cross-label duplicate group is
  dropped with a warning naming all files; the shared copy therefore loads 436/209/133
  (benign/malignant/normal) instead of 437/210/133. Same-label duplicates are kept, warned
  about, and kept in one split by ``splits.split_cases``.
- Some images carry measurement overlays (callipers, text); they are kept as they are.
"""
from __future__ import annotations

import re
from pathlib import Path

from common.data import (CentreLoad, IssueLog, natural_key, resolve_duplicates, scan_folder)
from common.records import Case, Label

CENTRE = "BUSI"
INNER = "Dataset_BUSI_with_GT"
CLASS_FOLDERS = {"benign": Label.BENIGN, "malignant": Label.MALIGNANT, "normal": Label.NORMAL}
_MASK = re.compile(r"^(?P<stem>.+?)_mask(?:_\d+)?$", re.IGNORECASE)


def _base(root: Path) -> Path:
    inner = root / INNER
    return inner if inner.is_dir() else root


def load(root: Path, *, strict: bool = True) -> CentreLoad:
    """All three class folders → ``CentreLoad``; strict raises on any error."""
    root = Path(root)
    log = IssueLog(CENTRE, root)
    base = _base(root)
    if not base.is_dir():
        log.error(root, "folder not found", "layout")
        return log.finish([], strict)
    folders = {c.name.lower(): c for c in base.iterdir() if c.is_dir()}
    for child in sorted(base.iterdir(), key=natural_key):
        if child.name.lower() not in CLASS_FOLDERS and not child.name.startswith("."):
            log.warning(child, "not a class folder (benign/malignant/normal); ignored", "stray")
    cases: list[Case] = []
    for name, label in CLASS_FOLDERS.items():
        folder = folders.get(name)
        if folder is None:
            log.warning(base / name, "class folder missing", "layout")
            continue
        cases += _load_folder(folder, label, log)
    cases = resolve_duplicates(cases, log, merge_patients=True)
    return log.finish(cases, strict)


def _load_folder(folder: Path, label: Label, log: IssueLog) -> list[Case]:
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for f in scan_folder(folder, log):
        m = _MASK.match(f.stem)
        if m:
            masks.setdefault(m["stem"], []).append(f)
        else:
            images[f.stem] = f
    if not images:
        log.warning(folder, "no images in this class folder", "layout")
    for stem, files in masks.items():
        if stem not in images:
            for f in files:
                log.warning(f, f"mask without image (no {stem}.png); ignored", "orphan")
    cases = []
    for stem, path in images.items():
        case = log.case(path, masks.get(stem, []), label, case_id=stem, patient_id=stem)
        if case is not None:
            cases.append(case)
    return cases
