"""common/runfolder.py: the run folder every kind of run shares: fresh timestamped folders,
resolved config, CSV and JSON-lines tables, merged provenance."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.runfolder import RunFolder


@dataclass(frozen=True)
class _Cfg:
    b: int = 2
    a: str = "x"


class _WithSubfolder(RunFolder):
    PREFIX = "demo"

    def prepare(self) -> None:
        (self.path / "extra").mkdir(exist_ok=True)


def test_create_names_folders_by_time_and_never_reuses_one(tmp_path: Path) -> None:
    a, b = _WithSubfolder.create(tmp_path), _WithSubfolder.create(tmp_path)
    assert a.path != b.path and isinstance(a, _WithSubfolder)
    assert a.path.name.startswith("demo-") and (a.path / "extra").is_dir()
    assert RunFolder.create(tmp_path, prefix="fed").path.name.startswith("fed-")


def test_open_needs_the_config_of_the_first_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        RunFolder.open(tmp_path)
    folder = RunFolder.create(tmp_path)
    folder.write_config(_Cfg())  # a config dataclass, keys in field order
    assert (folder.path / "config.yaml").read_text() == "b: 2\na: x\n"
    folder.write_config({"z": 1, "a": [0]})  # or a plain mapping
    assert RunFolder.open(folder.path).read_config() == {"z": 1, "a": [0]}


def test_csv_header_once_rows_appended_and_atomic_rewrite(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")  # created on the first write
    folder.append_csv("m.csv", ("round", "value"), [])
    assert not folder.path.exists()
    folder.append_csv("m.csv", ("round", "value"), [(1, "0.5")])
    folder.append_csv("m.csv", ("round", "value"), [(2, "a,b")])
    assert (folder.path / "m.csv").read_bytes() == b'round,value\r\n1,0.5\r\n2,"a,b"\r\n'
    assert folder.read_csv("m.csv") == [{"round": "1", "value": "0.5"}, {"round": "2", "value": "a,b"}]
    folder.write_csv("m.csv", ("round", "value"), [(1, "0.5")])
    assert folder.read_csv("m.csv") == [{"round": "1", "value": "0.5"}]
    assert folder.read_csv("absent.csv") == []


def test_jsonl_append_and_rewrite(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_jsonl("m.jsonl", [{"r": 1}, {"r": 2}])
    folder.append_jsonl("m.jsonl", [{"r": 3}])
    assert [json.loads(x)["r"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2, 3]
    folder.write_jsonl("m.jsonl", [{"r": 1}])
    assert (tmp_path / "m.jsonl").read_text() == '{"r": 1}\n'


def test_provenance_is_created_once_and_lists_grow(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    first = folder.write_provenance(seeds=[0], events=["start"])
    assert "git_commit" in first and "torch" in first["versions"] and "data_fingerprint" not in first
    prov = folder.write_provenance(events=["resume"], seeds=1)
    assert json.loads((tmp_path / "provenance.json").read_text()) == prov
    assert prov["events"] == ["start", "resume"] and prov["seeds"] == 1
    assert prov["time_utc"] == first["time_utc"]  # the first start's record is kept
