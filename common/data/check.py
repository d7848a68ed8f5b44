"""Site check: load a site's data leniently and summarise what a data manager must look at.

Runs at the hospital before it joins a federation (``fedbus-site-check``); nothing leaves the
site. The report counts classes, image sizes, mask problems, duplicates and the kind of
annotation each image has (mask and label, label only, mask only, normal), then lists every issue
with its file.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.data import Exclusion, Issue, apply_exclusions, canonical_format, detect_format, load_format
from common.data.splits import duplicate_groups
from common.records import Case, Label

MASK_KINDS = {"missing": "mask-missing", "mismatched": "mask-size", "non-binary": "mask-nonbinary",
              "empty for a lesion": "mask-empty"}
#: Kinds of annotation, in report order: a lesion image with its mask and its label, with the
#: label only (no drawn mask), with the mask only (no pathology label), and a normal image
#: (labelled normal: nothing to draw).
ANNOTATION_KINDS: tuple[str, ...] = ("mask and label", "label only", "mask only", "normal")


def annotation_counts(cases: Sequence[Case]) -> dict[str, int]:
    """Images per kind of annotation (``ANNOTATION_KINDS``); the counts sum to ``len(cases)``."""
    counts = dict.fromkeys(ANNOTATION_KINDS, 0)
    for c in cases:
        if not c.has_label:
            kind = "mask only"
        elif c.label == Label.NORMAL:
            kind = "normal"
        else:
            kind = "mask and label" if c.has_mask else "label only"
        counts[kind] += 1
    return counts


@dataclass
class SiteReport:
    """Summary of one site's data. ``ok``: at least one usable case and no errors (with
    ``skip_invalid``: errors are files left out, listed, and do not fail the check)."""

    path: str
    fmt: str
    per_class: dict[str, int]
    heights: tuple[int, int] | None
    widths: tuple[int, int] | None
    spacing_known: int
    masks: dict[str, int]
    duplicate_groups: int
    duplicate_images: int
    cross_label_groups: int  # identical images under different labels (loaders drop them)
    issues: list[Issue] = field(default_factory=list)
    skip_invalid: bool = False
    annotations: dict[str, int] = field(default_factory=dict)  # annotation_counts of the cases

    @property
    def n_cases(self) -> int:
        return sum(self.per_class.values())

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def excluded(self) -> list[Issue]:
        """Files left out by the site YAML's ``data.exclude`` (warnings of kind "excluded")."""
        return [i for i in self.issues if i.kind == "excluded"]

    @property
    def ok(self) -> bool:
        return self.n_cases > 0 and (self.skip_invalid or not self.errors)

    def format(self) -> str:
        """Human-readable report: summary lines, then every issue with its file."""
        classes = " · ".join(f"{k} {v}" for k, v in self.per_class.items())
        size = (f"H {self.heights[0]}–{self.heights[1]}, W {self.widths[0]}–{self.widths[1]} px"
                if self.heights and self.widths else "n/a")
        masks = " · ".join(f"{k} {v}" for k, v in self.masks.items())
        lines = [
            f"Site check: {self.path} (format {self.fmt})",
            f"cases: {self.n_cases}  ({classes})",
            f"image size: {size}; pixel spacing known for {self.spacing_known}/{self.n_cases}",
            f"masks: {masks}",
            "annotations: " + " · ".join(f"{k} {v}" for k, v in self.annotations.items()),
            f"duplicates: {self.duplicate_groups} group(s) of identical images "
            f"({self.duplicate_images} images) among loaded cases; "
            f"{self.cross_label_groups} cross-label group(s) dropped (label unknown)",
            f"issues: {len(self.errors)} error(s), {len(self.warnings)} warning(s)",
        ]
        lines += [f"  {issue}" for issue in self.issues]
        if self.excluded:
            lines.append(f"left out by data.exclude: {len(self.excluded)} file(s) (listed above)")
        if self.skip_invalid and self.errors:
            lines.append(f"--skip-invalid: {len(self.errors)} invalid file(s) left out; training uses "
                         f"the {self.n_cases} valid case(s):")
            lines += [f"  skipped: {e.path}: {e.message}" for e in self.errors]
        verdict = "OK" if self.ok else (f"FAILED: {len(self.errors)} error(s)" if self.errors
                                        else "FAILED: no usable images")
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


def check_site(path: Path | str, fmt: str = "auto", exclude: tuple[Exclusion, ...] = (),
               skip_invalid: bool = False) -> SiteReport:
    """Load ``path`` (format detected when "auto") without raising on bad files, and report.
    ``exclude``: the site YAML's ``data.exclude``; ``skip_invalid``: errors do not fail the check.

    Raises ``DataError``/``ValueError`` only when the layout cannot be recognised or the format
    name is unknown (usage errors, not data errors).
    """
    name = detect_format(path) if fmt.strip().lower() == "auto" else canonical_format(fmt)
    result = apply_exclusions(load_format(name, Path(path), strict=False), Path(path), tuple(exclude))
    cases, issues = result.cases, result.issues
    # a mask-only case's label is a placeholder: counted as unlabelled, not as a class
    per_class = {label.name.lower(): sum(c.has_label and c.label == label for c in cases)
                 for label in Label}
    if any(not c.has_label for c in cases):
        per_class["unlabelled"] = sum(not c.has_label for c in cases)
    kinds = Counter(i.kind for i in issues)
    masks = {"with lesion": sum(c.has_lesion for c in cases),
             "empty (normal)": sum(not c.has_lesion for c in cases)}
    masks.update({k: kinds[v] for k, v in MASK_KINDS.items()})
    groups = Counter(duplicate_groups(cases))
    multi = [g for g, n in groups.items() if n > 1]
    heights = [c.image.shape[0] for c in cases]
    widths = [c.image.shape[1] for c in cases]
    return SiteReport(
        path=str(path), fmt=name, per_class=per_class,
        heights=(min(heights), max(heights)) if cases else None,
        widths=(min(widths), max(widths)) if cases else None,
        spacing_known=sum(c.spacing_mm is not None for c in cases), masks=masks,
        duplicate_groups=len(multi), duplicate_images=sum(groups[g] for g in multi),
        cross_label_groups=kinds["duplicate-conflict"], issues=issues, skip_invalid=skip_invalid,
        annotations=annotation_counts(cases))
