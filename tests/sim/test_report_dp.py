"""sim.report_dp's ε-utility points and plot, from hand-made results.csv rows."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from sim.report_dp import epsilon_points, main


def _rows(arm: str, centre: str, seed: int, dice: float, auc: float) -> list[dict]:
    base = {"protocol": "paper", "arm": arm, "train_set": "BrEaST", "test_centre": centre, "seed": seed, "n": 10}
    return [{**base, "metric": "dice", "value": dice, "ci_low": dice - 0.1, "ci_high": dice + 0.1},
            {**base, "metric": "auc", "value": auc, "ci_low": auc - 0.1, "ci_high": auc + 0.1},
            {**base, "metric": "iou", "value": 0.0, "ci_low": 0.0, "ci_high": 0.0}]


def _results() -> pd.DataFrame:
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        rows += _rows("consistency", "BUSI", seed, 0.60 + shift, 0.80)
        rows += _rows("consistency-eps8", "BUSI", seed, 0.50 + shift, 0.70)
    rows += _rows("plain", "BUSI", 0, 0.9, 0.9)  # an arm without a DP variant: not a point
    return pd.DataFrame(rows)


def test_points_are_seed_means_with_infinity_for_the_arm_without_dp() -> None:
    pts = epsilon_points(_results())
    assert set(pts["base_arm"]) == {"consistency"} and set(pts["metric"]) == {"dice", "auc"}
    dice = pts[pts["metric"] == "dice"].set_index("target_eps")["value"]
    assert dice[8.0] == pytest.approx(0.51) and dice[math.inf] == pytest.approx(0.61)
    assert epsilon_points(pd.DataFrame(_rows("plain", "BUSI", 0, 0.9, 0.9))).empty


def test_cli_draws_the_plot_of_run_folders_and_names_a_missing_results_file(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _results().to_csv(run / "results.csv", index=False)
    assert main([str(run), "--out", str(tmp_path / "img" / "eps")]) == 0
    assert (tmp_path / "img" / "eps.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "img" / "eps.csv")) == 4
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert "nowhere/results.csv: no results.csv" in capsys.readouterr().err
