"""The run folder: one folder per run holding its resolved ``config.yaml``, ``provenance.json`` and
result tables. Every whole-file write goes through ``common.atomic`` (a reader sees the old file
or the new one); CSV/JSON-lines appends add complete lines only.

What a kind of run keeps beyond that lives in its subclass: the simulation's units
(sim/runfolder.py), the federation's checkpoint, status and round metrics (server/state.py).
Light on purpose (no torch, no pandas at import): the launchers read run folders too.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from common.atomic import atomic_write
from common.config import to_dict

CONFIG, PROVENANCE = "config.yaml", "provenance.json"

_Folder = TypeVar("_Folder", bound="RunFolder")


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]], header: bool) -> str:
    """Rows as csv.writer writes them to a file (its default dialect)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    if header:
        writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _jsonl_text(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(dict(r)) + "\n" for r in records)


class RunFolder:
    """``path`` and its files. ``create`` makes a fresh timestamped folder, ``open`` an existing
    one to resume (it must hold the config.yaml of its first start); plain construction is for a
    folder whose name the caller chose (a federation's ``run_dir``)."""

    #: Name prefix of the folders ``create`` makes.
    PREFIX = "run"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls: type[_Folder], root: str | Path, prefix: str | None = None) -> _Folder:
        """A fresh folder ``root/<prefix>-YYYYmmdd-HHMMSS`` (local time); a numeric suffix
        avoids collisions with folders made in the same second."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            path = root / (f"{prefix or cls.PREFIX}-{stamp}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            folder = cls(path)
            folder.prepare()
            return folder
        raise RuntimeError(f"{root}: could not create a unique run folder")

    @classmethod
    def open(cls: type[_Folder], path: str | Path) -> _Folder:
        """An existing run folder to resume; it must hold the config.yaml of its first start."""
        folder = cls(Path(path))
        if not folder.file(CONFIG).is_file():
            raise FileNotFoundError(f"{folder.path}: not a run folder (no {CONFIG})")
        folder.prepare()
        return folder

    def prepare(self) -> None:
        """Sub-folders this kind of run folder needs (called by create and open)."""

    # -- files ------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        """Replace ``name`` with ``text`` atomically (folder created when missing)."""
        return atomic_write(self.file(name), lambda fh: fh.write(text), mode=None)  # shared results

    def write_config(self, resolved: Any) -> None:
        """The resolved configuration as YAML, keys in their given order: a config dataclass
        (converted with ``common.config.to_dict``) or a plain mapping."""
        data = to_dict(resolved) if dataclasses.is_dataclass(resolved) else dict(resolved)
        self.write_text(CONFIG, yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self.file(CONFIG).read_text(encoding="utf-8")) or {})

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text(encoding="utf-8"))

    # -- tables -----------------------------------------------------------------------------
    def append_csv(self, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Append rows to ``name``, writing the header first when the file is new."""
        rows = list(rows)
        if not rows:
            return
        path = self.file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as fh:
            fh.write(_csv_text(columns, rows, header=new))

    def write_csv(self, name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Replace ``name`` with the header and ``rows`` atomically."""
        self.write_text(name, _csv_text(columns, rows, header=True))

    def read_csv(self, name: str) -> list[dict[str, str]]:
        """Rows of ``name`` keyed by its header; empty when the file does not exist."""
        path = self.file(name)
        if not path.exists():
            return []
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def append_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Append one JSON object per line to ``name``."""
        text = _jsonl_text(records)
        if not text:
            return
        path = self.file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text)

    def write_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace ``name`` with one JSON object per line, atomically."""
        self.write_text(name, _jsonl_text(records))

    # -- provenance -------------------------------------------------------------------------
    def write_provenance(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into provenance.json (created with ``common.checkpoint.provenance``:
        package versions, git commit, time, plus platform and argv; data fingerprints are the
        caller's fields, one run may read several data sets); list values are appended to."""
        path = self.file(PROVENANCE)
        prov: dict[str, Any] = self.read_json(PROVENANCE) if path.is_file() else {}
        if not prov:
            from common.checkpoint import provenance  # imports torch: only when first written

            prov = {k: v for k, v in provenance().items() if k != "data_fingerprint"}
            prov.update(platform=platform.platform(), argv=sys.argv)
        for key, value in fields.items():
            if isinstance(value, list) and isinstance(prov.get(key), list):
                prov[key] = prov[key] + value
            else:
                prov[key] = value
        self.write_text(PROVENANCE, json.dumps(prov, indent=2, default=str))
        return prov
