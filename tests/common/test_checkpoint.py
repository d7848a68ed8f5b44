from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import ExperimentConfig, replace, to_dict


def test_round_trip_with_config_provenance_and_extra(tmp_path: Path):
    cfg = replace(ExperimentConfig(), **{"train.epochs": 3})
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.5])}
    path = save_checkpoint(
        tmp_path / "sub" / "ckpt.pt", state, cfg,
        round=4, data_fingerprint="abc123", scores=np.array([0.5, 0.75]), where=tmp_path,
        scalar=np.array(0.25),
    )
    ck = load_checkpoint(path)
    assert set(ck) == {"state_dict", "config", "provenance", "extra"}
    assert torch.equal(ck["state_dict"]["w"], state["w"])
    assert ck["config"] == to_dict(cfg) and ck["config"]["train"]["epochs"] == 3
    prov = ck["provenance"]
    assert prov["data_fingerprint"] == "abc123"
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["monai"]
    assert prov["time_utc"].endswith("+00:00")
    assert ck["extra"]["round"] == 4
    assert torch.allclose(ck["extra"]["scores"], torch.tensor([0.5, 0.75], dtype=torch.float64))
    assert ck["extra"]["where"] == str(tmp_path)
    assert ck["extra"]["scalar"].shape == () and ck["extra"]["scalar"].item() == 0.25  # 0-d stays 0-d
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_dict_config_and_overwrite(tmp_path: Path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.zeros(1)}, {"a": 1})
    save_checkpoint(path, {"x": torch.ones(1)}, {"a": 2})
    ck = load_checkpoint(path)
    assert ck["config"] == {"a": 2} and ck["state_dict"]["x"].item() == 1.0


def test_errors_name_the_file(tmp_path: Path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt"):
        load_checkpoint(foreign)


def test_failed_save_leaves_previous_file_intact(tmp_path: Path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.ones(1)}, {})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"x": torch.zeros(1)}, {}, bad=Unpicklable())
    assert load_checkpoint(path)["state_dict"]["x"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
