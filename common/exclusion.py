"""A case a site leaves out (site YAML ``data.exclude``, with its reason) and how the list travels
to a Flower client (node_config ``data-exclude``). Standard library only: ``SiteSpec`` holds these
and the launchers parse site specs without NumPy, Pillow or torch (``common.data.apply_exclusions`` applies them)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote


@dataclass(frozen=True)
class Exclusion:
    """A case the site leaves out (site YAML ``data.exclude``): ``file`` is a path relative to
    the site's folder or a case id; ``reason`` is said wherever the exclusion is listed."""

    file: str
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.file.strip():
            raise ValueError("data.exclude: an entry needs a file or case id")

    def matches(self, path: str, root: Path, case_id: str | None = None) -> bool:
        """Whether ``path`` (a file of the site) or ``case_id`` is this entry: the same relative
        path, or, for an entry without a folder part, the case id or the file name stem (so
        ``case7`` or ``case7.png`` leaves out the image and the mask files named after it)."""
        want = self.file.strip().replace("\\", "/")
        if case_id is not None and case_id == want:
            return True
        if not path:
            return False
        p = Path(path)
        try:
            rel = p.relative_to(root).as_posix() if p.is_absolute() else p.as_posix()
        except ValueError:
            rel = p.as_posix()
        if rel == want:
            return True
        if "/" in want:
            return False
        stem = Path(want).stem
        return p.stem in (want, stem) or p.stem.startswith(f"{stem}_mask")


def exclusions_to_node(exclude: tuple[Exclusion, ...]) -> str:
    """``exclude`` as a node_config value: percent-encoded compact JSON (Flower's ``--node-config``
    parser takes no quote inside a string and no list of tables)."""
    text = json.dumps([{"file": e.file, "reason": e.reason} for e in exclude], separators=(",", ":"))
    return quote(text, safe="")


def exclusions_from_node(text: str) -> tuple[Exclusion, ...]:
    """The inverse of ``exclusions_to_node``; ValueError on anything else."""
    try:
        items = json.loads(unquote(text)) if text else []
        return tuple(Exclusion(str(d["file"]), str(d.get("reason", ""))) for d in items)
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"data-exclude: expected percent-encoded JSON [{{file, reason}}]: {exc}") from None
