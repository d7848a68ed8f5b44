"""Run folder: tidy tables written per unit, completion tracked by results.csv, provenance."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sim.runfolder import RESULT_COLUMNS, SimRunFolder, Unit


def _results(unit: Unit, centres: list[str], value: float = 0.5) -> pd.DataFrame:
    rows = [
        {**unit.columns(), "test_centre": c, "metric": m, "value": value, "ci_low": value - 0.1,
         "ci_high": value + 0.1, "n": 10}
        for c in centres for m in ("dice", "auc")
    ]
    return pd.DataFrame(rows)


def test_create_makes_unique_folders(tmp_path):
    a = SimRunFolder.create(tmp_path)
    b = SimRunFolder.create(tmp_path)
    assert a.path != b.path
    assert a.path.name.startswith("lco-") and (a.path / "examples").is_dir()


def test_open_requires_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        SimRunFolder.open(tmp_path)
    folder = SimRunFolder.create(tmp_path)
    folder.write_config({"lco": {"seeds": [0]}})
    assert SimRunFolder.open(folder.path).read_config() == {"lco": {"seeds": [0]}}


def test_write_unit_appends_and_marks_complete(tmp_path):
    folder = SimRunFolder.create(tmp_path)
    u1 = Unit("paper", "multitask", "BrEaST", 0)
    u2 = Unit("paper", "consistency", "BrEaST", 0)
    per_image = pd.DataFrame({"test_centre": ["BUSI"] * 3, "case_id": ["a", "b", "c"], "dice": [0.1, 0.2, np.nan]})
    folder.write_unit(u1, _results(u1, ["BUSI", "UDIAT"]), per_image,
                      pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.5]}))
    folder.write_unit(u2, _results(u2, ["BUSI", "UDIAT"]), per_image)
    res = folder.read("results")
    assert list(res.columns) == list(RESULT_COLUMNS)
    assert len(res) == 2 * 2 * 2
    assert folder.completed_units() == {u1.key, u2.key}
    pi = folder.read("per_image")
    assert list(pi.columns[:4]) == ["protocol", "arm", "train_set", "seed"]
    assert len(pi) == 6 and pi["dice"].isna().sum() == 2
    # Rewriting a unit replaces its rows rather than duplicating them.
    folder.write_unit(u1, _results(u1, ["BUSI", "UDIAT"], value=0.9))
    res = folder.read("results")
    assert len(res) == 8
    assert res[res["arm"] == "multitask"]["value"].eq(0.9).all()


def test_drop_incomplete_removes_orphan_rows(tmp_path):
    folder = SimRunFolder.create(tmp_path)
    done = Unit("local", "consistency", "BUSI", 0)
    folder.write_unit(done, _results(done, ["BUSI"]), pd.DataFrame({"case_id": ["a"], "dice": [0.3]}))
    # Simulate a crash after per_image.csv was written but before results.csv.
    orphan = Unit("local", "consistency", "UDIAT", 0)
    pi = pd.concat([folder.read("per_image"),
                    pd.DataFrame([{**orphan.columns(), "case_id": "z", "dice": 0.7}])], ignore_index=True)
    pi.to_csv(folder.per_image_csv, index=False)
    folder.drop_incomplete()
    assert set(folder.read("per_image")["train_set"]) == {"BUSI"}
    assert orphan.key not in folder.completed_units()


def test_write_unit_rejects_missing_columns(tmp_path):
    folder = SimRunFolder.create(tmp_path)
    with pytest.raises(ValueError, match="ci_low"):
        folder.write_unit(Unit("paper", "a", "X", 0), pd.DataFrame({"protocol": ["paper"], "value": [1.0]}).assign(
            arm="a", train_set="X", seed=0, test_centre="Y", metric="dice", ci_high=1.0, n=1))


def test_unit_key_is_filesystem_safe():
    key = Unit("fedavg", "consistency", "BUS-UCLM+BUSI", 3).key
    assert key == "fedavg__consistency__BUS-UCLM+BUSI__s3"
    assert "/" not in Unit("paper", "a/b", "c d", 0).key


def test_provenance_merges_fields(tmp_path):
    folder = SimRunFolder.create(tmp_path)
    folder.write_provenance(seeds=[0], events=[{"start": 1}])
    prov = folder.write_provenance(events=[{"resume": 2}])
    saved = json.loads((folder.path / "provenance.json").read_text())
    assert saved == prov
    assert saved["events"] == [{"start": 1}, {"resume": 2}]
    assert saved["seeds"] == [0]
    assert "torch" in saved["versions"] and "git_commit" in saved
