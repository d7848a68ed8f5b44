"""server/state.py: checkpoint round trip (weights, RNG, strategy state), metrics files."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from common.config import ConfigError, ExperimentConfig, replace
from common.federation import FederationConfig, RunSpec, SiteSpec, load_run_spec
from server.state import (
    METRIC_COLUMNS,
    MetricRow,
    ServerRunFolder,
    check_resumable,
)


def _spec(tmp_path, **fed) -> RunSpec:
    return RunSpec(
        experiment=replace(ExperimentConfig(), **{"data.image_size": 32}),
        federation=FederationConfig(**fed),
        sites=(SiteSpec("A", synthetic_centre="c0"), SiteSpec("B", synthetic_centre="c1")),
        run_dir=str(tmp_path / "run"),
    )


def test_checkpoint_restores_weights_round_strategy_state_and_rng(tmp_path) -> None:
    spec = _spec(tmp_path, strategy="fedadam")
    folder = ServerRunFolder(spec.run_dir)
    weights = {"w": torch.arange(4.0), "b": torch.tensor([1.5])}
    moments = {"m_t": {"w": torch.ones(4)}, "v_t": {"w": torch.full((4,), 2.0), "s": torch.tensor(3.0)}}
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    folder.save(2, weights, spec, "abc123", moments)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = folder.load(restore=True)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert loaded.round == 2 and loaded.run_key == "abc123" and loaded.spec == spec
    torch.testing.assert_close(loaded.state_dict["w"], weights["w"])
    torch.testing.assert_close(loaded.strategy_state["v_t"]["w"], moments["v_t"]["w"])
    assert loaded.strategy_state["v_t"]["s"].shape == ()  # 0-d state keeps its shape


def test_metrics_are_appended_to_csv_and_jsonl_with_the_fixed_columns(tmp_path) -> None:
    folder = ServerRunFolder(tmp_path)
    folder.append_metrics([MetricRow(1, "train", "A", "train_loss", 0.5)])
    folder.append_metrics([MetricRow(1, "evaluate", "B", "dice", 0.25), MetricRow(2, "central", "C", "auc", -1.0)])
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS) and len(lines) == 4
    assert lines[2] == "1,evaluate,B,dice,0.25"
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[2] == {"round": 2, "phase": "central", "site": "C", "metric": "auc", "value": -1.0}
    assert folder.read_metrics()[0] == MetricRow(1, "train", "A", "train_loss", 0.5)


def test_truncate_drops_rows_of_unfinished_rounds_in_both_files(tmp_path) -> None:
    folder = ServerRunFolder(tmp_path)
    folder.append_metrics([MetricRow(r, "train", "A", "x", float(r)) for r in (1, 2, 3)])
    assert folder.truncate_metrics(2) == 1
    assert [r.round for r in folder.read_metrics()] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert folder.truncate_metrics(2) == 0


def test_config_and_status_files(tmp_path) -> None:
    spec = _spec(tmp_path)
    folder = ServerRunFolder(spec.run_dir)
    folder.write_config(spec)
    assert load_run_spec(folder.path / "config.yaml") == spec
    folder.write_status("stopped", 3, "no quorum")
    assert folder.read_status() == {"state": "stopped", "round": 3, "message": "no quorum"}


def test_resume_refuses_changed_results_settings_but_allows_more_rounds(tmp_path) -> None:
    saved = _spec(tmp_path, rounds=2)
    check_resumable(_spec(tmp_path, rounds=5, round_timeout_s=9.0), saved, "ck")
    with pytest.raises(ConfigError, match="strategy"):
        check_resumable(_spec(tmp_path, rounds=5, strategy="fedprox"), saved, "ck")
    with pytest.raises(ConfigError, match="server_momentum"):  # FedAvgM's β changes every later step
        check_resumable(_spec(tmp_path, rounds=5, server_momentum=0.5), saved, "ck")
    other_exp = replace(saved, experiment=replace(saved.experiment, **{"train.lr": 0.5}))
    with pytest.raises(ConfigError, match="experiment"):
        check_resumable(other_exp, saved, "ck")
