"""sim.report_dp's ε-utility points and plot, from hand-made results.csv rows."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from sim.report_dp import epsilon_points, label_private_run, main


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


def _spent(arm: str, centre: str, eps: float) -> dict:
    return {"protocol": "paper", "arm": arm, "train_set": "BrEaST", "test_centre": centre, "seed": 0,
            "metric": "epsilon", "value": eps, "ci_low": None, "ci_high": None, "n": 10}


def _run(folder, rows: list[dict], privacy: dict) -> None:
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    (folder / "config.yaml").write_text(yaml.safe_dump({"privacy": privacy}))


def test_a_run_private_on_every_arm_reads_as_its_epsilon_not_infinity() -> None:
    rows = pd.DataFrame([*_rows("consistency", "BUSI", 0, 0.6, 0.8), _spent("consistency", "BUSI", 2.9),
                         *_rows("plain", "BUSI", 0, 0.9, 0.9)])  # no ε spent: trained without DP
    labelled = label_private_run(rows, {"enabled": True, "target_epsilon": 3.0})
    assert set(labelled["arm"]) == {"consistency-eps3", "plain"}
    assert label_private_run(rows, {"enabled": False, "target_epsilon": 3.0}).equals(rows)


def test_cli_joins_one_epsilon_per_run_with_a_reference_runs_infinity(tmp_path, capsys) -> None:
    for eps, dice in ((1, 0.4), (8, 0.5)):
        _run(tmp_path / f"e{eps}", [*_rows("consistency", "BUSI", 0, dice, 0.7), _spent("consistency", "BUSI", eps)],
             {"enabled": True, "target_epsilon": float(eps)})
    # the reference's own DP arm (another recipe) must not blend into the ε 8 point
    _run(tmp_path / "ref", [*_rows("consistency", "BUSI", 0, 0.7, 0.9), *_rows("consistency-eps8", "BUSI", 0, 0.1, 0.5)],
         {"enabled": False, "target_epsilon": 8.0})
    assert main([str(tmp_path / "e1"), str(tmp_path / "e8"), "--reference", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "eps")]) == 0
    pts = pd.read_csv(tmp_path / "eps.csv")
    dice = pts[pts["metric"] == "dice"].set_index("target_eps")["value"]
    assert dice.to_dict() == pytest.approx({1.0: 0.4, 8.0: 0.5, math.inf: 0.7})
    (tmp_path / "e1" / "config.yaml").write_text("privacy: [unclosed")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "e1"), "--out", str(tmp_path / "x")])
    assert "e1/config.yaml: not a readable run config" in capsys.readouterr().err


def test_a_tiny_run_private_on_every_arm_says_so_and_plots_at_its_epsilon(tmp_path) -> None:
    import sim.leave_center_out as lco

    out = tmp_path / "runs"
    assert lco.main(["--preset", "smoke", "--no-progress", "--protocols", "paper", "--set", "sim.arms=consistency",
                     "--set", "privacy.enabled=true", "--set", "privacy.target_epsilon=3",
                     "--set", "sim.synthetic_n=24", "--out", str(out)]) == 0
    (folder,) = sorted(out.glob("lco-*"))
    assert "- DP-SGD on every arm: target ε 3 (σ planned for the target)" in (folder / "report.md").read_text()
    assert main([str(folder), "--out", str(tmp_path / "eps")]) == 0
    assert set(pd.read_csv(tmp_path / "eps.csv")["target_eps"]) == {3.0}
