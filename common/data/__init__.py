"""Real-data entry points: one loader per centre layout, plus a generic manifest for new sites.

Every loader returns a ``CentreLoad``: the cases it could build and an ``Issue`` for every file
it skipped or repaired, so nothing is dropped silently. Errors mean malformed input (unreadable
file, missing counterpart, missing or unknown label, unalignable mask); warnings mean a
documented repair (mask resized or thresholded, conflicting duplicate dropped, stray file
ignored). ``strict=True`` raises one ``DataError`` listing every error.
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from common.data.io import FileError, MaskFile, Note, assemble_case, read_case
from common.data.splits import duplicate_groups
from common.exclusion import Exclusion, exclusions_from_node, exclusions_to_node
from common.records import Case, DataError, Label

log = logging.getLogger(__name__)

CENTRES: tuple[str, ...] = ("BrEaST", "UDIAT", "BUSI", "BUS-UCLM")
FORMATS: tuple[str, ...] = CENTRES + ("manifest",)
_MODULES = {"BrEaST": "breast", "UDIAT": "udiat", "BUSI": "busi", "BUS-UCLM": "busuclm",
            "manifest": "manifest"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Issue:
    """One problem with one file. kind: a short code the site check counts by (may be "")."""

    level: Literal["error", "warning"]
    path: str
    message: str
    kind: str = ""

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


@dataclass
class CentreLoad:
    cases: list[Case]
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]


class IssueLog:
    """Collects issues while a loader walks a folder; ``finish`` applies strict mode."""

    def __init__(self, centre: str, root: Path) -> None:
        self.centre, self.root = centre, Path(root)
        self.issues: list[Issue] = []

    def error(self, path: object, message: str, kind: str = "") -> None:
        self.issues.append(Issue("error", str(path), message, kind))

    def warning(self, path: object, message: str, kind: str = "") -> None:
        self.issues.append(Issue("warning", str(path), message, kind))

    def failed(self, exc: DataError, path: object) -> None:
        """File a caught DataError, without repeating the path inside the message."""
        if isinstance(exc, FileError):
            self.error(exc.path, exc.text, exc.kind)
        else:
            text = str(exc)
            prefix = f"{path}: "
            self.error(path, text[len(prefix):] if text.startswith(prefix) else text)

    def notes(self, notes: list[Note]) -> None:
        for n in notes:
            self.warning(n.path, n.message, n.kind)

    def case(self, image_path: Path, mask_paths: list[Path], label: Label,
             **fields: object) -> Case | None:
        """``read_case`` with its errors and warnings filed here; None when it failed."""
        try:
            case, notes = read_case(image_path, list(mask_paths), label, centre=self.centre,
                                    **fields)
        except DataError as exc:
            self.failed(exc, image_path)
            return None
        self.notes(notes)
        return case

    def finish(self, cases: list[Case], strict: bool) -> CentreLoad:
        if not cases and not any(i.level == "error" for i in self.issues):
            self.error(self.root, "no usable images found", "layout")
        result = CentreLoad(cases, list(self.issues))
        if strict and result.errors:
            raise DataError(format_errors(self.centre, self.root, result.errors))
        return result


def natural_key(path: Path | str) -> tuple[object, ...]:
    """'benign (10)' after 'benign (9)': digit runs compare as numbers."""
    parts = re.split(r"(\d+)", Path(path).name.lower())
    return tuple(int(t) if t.isdigit() else t for t in parts)


def scan_folder(folder: Path, log_: IssueLog) -> list[Path]:
    """Image files in a folder (sorted naturally); anything else is reported and ignored.

    Dot-files (.DS_Store and the like) are OS metadata and are skipped without an issue; an
    image name that is not a regular file (a FIFO, a device) is an error, never opened.
    """
    files = []
    for f in sorted(folder.iterdir(), key=natural_key):
        if f.name.startswith("."):
            continue
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            files.append(f)
        elif f.suffix.lower() in IMAGE_SUFFIXES:  # stat only: opening a FIFO would block
            log_.error(f, "not a regular file (a FIFO, device or folder); refused", "not-regular")
        else:
            log_.warning(f, "not an image file; ignored", "stray")
    return files


def format_errors(centre: str, root: Path, errors: list[Issue]) -> str:
    lines = [f"{centre} at {root}: {len(errors)} error(s)"]
    lines += [f"  {e.path}: {e.message}" for e in errors]
    return "\n".join(lines)


def resolve_duplicates(cases: list[Case], log_: IssueLog, *,
                       merge_patients: bool = False) -> list[Case]:
    """Identical pixel arrays. Same label: keep all, warn (splits keep them together).
    Different labels: the truth is unknown, so drop every member, warning with all files.
    merge_patients: centres without patient ids give the group its first case's patient_id.
    """
    groups: dict[int, list[int]] = {}
    for idx, gid in enumerate(duplicate_groups(cases)):
        groups.setdefault(gid, []).append(idx)
    drop: set[int] = set()
    out = list(cases)
    for members in groups.values():
        if len(members) < 2:
            continue
        names = ", ".join(f"{cases[i].source} ({cases[i].label.name.lower()})" for i in members)
        if len({cases[i].label for i in members}) > 1:
            drop.update(members)
            log_.warning(cases[members[0]].source, f"identical image filed under different "
                         f"labels; all dropped: {names}", "duplicate-conflict")
            continue
        log_.warning(cases[members[0]].source, f"identical images (kept, split together): "
                     f"{names}", "duplicate")
        if merge_patients:
            for i in members[1:]:
                out[i] = replace(cases[i], patient_id=cases[members[0]].patient_id)
    return [c for i, c in enumerate(out) if i not in drop]


def canonical_format(name: str) -> str:
    """'bus_uclm', 'BUS-UCLM', 'breast' → the spelling in ``FORMATS``; ValueError otherwise."""
    key = _squash(name)
    for fmt in FORMATS:
        if _squash(fmt) == key:
            return fmt
    raise ValueError(f"unknown data format {name!r}; expected one of {', '.join(FORMATS)}")


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name)).lower()


def load_format(fmt: str, root: Path, *, strict: bool = True) -> CentreLoad:
    """Run one format's loader (centre name or "manifest")."""
    module = importlib.import_module(f"common.data.{_MODULES[canonical_format(fmt)]}")
    return module.load(Path(root), strict=strict)


def _log_issues(result: CentreLoad) -> None:
    for issue in result.issues:
        (log.error if issue.level == "error" else log.warning)("%s", issue)


def load_centre(name: str, root: Path | str, strict: bool = True) -> list[Case]:
    """A centre's cases; strict raises ``DataError`` listing every error, else issues are logged."""
    result = load_format(name, Path(root), strict=strict)
    _log_issues(result)
    return result.cases


def discover_centres(data_root: Path | str) -> dict[str, Path]:
    """Sub-folders of data_root named like a centre (case, '-', '_' and spaces ignored)."""
    root = Path(data_root)
    if not root.is_dir():
        return {}
    wanted = {_squash(c): c for c in CENTRES}
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and _squash(child.name) in wanted:
            found.setdefault(wanted[_squash(child.name)], child)
    return found


def detect_format(path: Path | str) -> str:
    """Recognise a site folder's layout from its files; DataError naming the folder if none."""
    p = Path(path)
    if not p.is_dir():
        if p.is_file() and p.suffix.lower() == ".csv":
            return "manifest"
        raise DataError(f"{p}: not a folder")
    names = {c.name.lower() for c in p.iterdir()}
    if "manifest.csv" in names:
        return "manifest"
    if "breast-lesions_usg-images_and_masks" in names or any(
            n.startswith("breast-lesions-usg-clinical-data") and n.endswith(".xlsx")
            for n in names):
        return "BrEaST"
    if "dataset_busi_with_gt" in names or {"benign", "malignant"} <= names:
        return "BUSI"
    if {"images", "masks"} <= names and "info.csv" in names:
        return "BUS-UCLM"
    if {"original", "gt"} <= names:
        return "UDIAT"
    for fmt in CENTRES:
        if _squash(p.name) == _squash(fmt):
            return fmt
    raise DataError(f"{p}: cannot recognise the layout of this folder (none of "
                    f"{', '.join(FORMATS)}); name the format explicitly")


def apply_exclusions(result: CentreLoad, root: Path, exclude: tuple[Exclusion, ...]) -> CentreLoad:
    """``result`` without the excluded cases and without the issues of excluded files; each
    exclusion is listed as a warning (kind "excluded", with its reason), and an entry that
    matched nothing is a warning too (a typo must not pass silently)."""
    if not exclude:
        return result
    root = Path(root)
    used: set[Exclusion] = set()

    def hit(path: str, case_id: str | None = None) -> Exclusion | None:
        for e in exclude:
            if e.matches(path, root, case_id):
                used.add(e)
                return e
        return None

    cases, notes = [], []
    for c in result.cases:
        e = hit(c.source, c.case_id)
        if e is None:
            cases.append(c)
        else:
            notes.append(Issue("warning", c.source or c.case_id, f"left out by data.exclude: {e.reason or 'no reason given'}",
                               "excluded"))
    issues = []
    for i in result.issues:
        e = hit(i.path)
        if e is None:
            issues.append(i)
        elif i.level == "error":
            notes.append(Issue("warning", i.path, f"left out by data.exclude ({e.reason or 'no reason given'}); "
                                                  f"it had: {i.message}", "excluded"))
    unused = [Issue("warning", str(root), f"data.exclude entry {e.file!r} matches no file or case", "exclude-unused")
              for e in exclude if e not in used]
    if not cases and not any(i.level == "error" for i in issues):
        issues.append(Issue("error", str(root), "no usable images left after data.exclude", "layout"))
    return CentreLoad(cases, issues + notes + unused)


def load_site(path: Path | str, fmt: str = "auto", *, strict: bool = True,
              exclude: tuple[Exclusion, ...] = ()) -> list[Case]:
    """A site's cases from any supported layout; fmt "auto" detects it (see ``detect_format``).
    ``exclude``: cases left out before strictness applies (``apply_exclusions``)."""
    name = detect_format(path) if fmt.strip().lower() == "auto" else canonical_format(fmt)
    if not exclude:
        return load_centre(name, path, strict=strict)
    result = apply_exclusions(load_format(name, Path(path), strict=False), Path(path), tuple(exclude))
    if strict and result.errors:
        raise DataError(format_errors(name, Path(path), result.errors))
    _log_issues(result)
    return result.cases



__all__ = ["CENTRES", "FORMATS", "IMAGE_SUFFIXES", "Issue", "CentreLoad", "IssueLog", "Exclusion",
           "apply_exclusions", "exclusions_to_node", "exclusions_from_node",
           "load_centre", "load_format", "discover_centres", "detect_format", "load_site",
           "canonical_format", "resolve_duplicates", "format_errors", "assemble_case",
           "MaskFile", "natural_key", "scan_folder"]
