"""The partial-mask summary on two hand-made run folders: seed-averaged Dice per arm and
fraction, the paired difference to the plain arm, and the plot written."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from benchmarks.mask_fraction import main, summarise


def _run(root: Path, fraction: float, shift: float, arms: tuple[str, ...] = ("multitask", "consistency-mask"),
         name: str = "") -> Path:
    rows, res = [], []
    for arm, delta in ((a, 0.0 if a == "multitask" else shift) for a in arms):
        for seed in (0, 1):
            for i in range(12):
                malignant = i % 2
                rows.append({"protocol": "paper", "arm": arm, "train_set": "BrEaST", "seed": seed,
                             "case_id": f"c{i}", "centre": "X", "test_centre": "X", "label": malignant,
                             "malignant": malignant, "has_lesion": True, "p_malignant": 0.2 + 0.6 * malignant,
                             "dice": 0.5 + 0.02 * i + delta + 0.01 * seed})
            for metric, value in (("dice", 0.6 + delta), ("auc", 1.0)):
                res.append({"protocol": "paper", "arm": arm, "train_set": "BrEaST", "test_centre": "X",
                            "seed": seed, "metric": metric, "value": value + 0.01 * seed})
    run = root / f"f{fraction}{name}"
    run.mkdir()
    pd.DataFrame(rows).to_csv(run / "per_image.csv", index=False)
    pd.DataFrame(res).to_csv(run / "results.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": {"data": {"mask_fraction": fraction}}}))
    return run


def test_summary_pairs_each_arm_with_plain_at_its_fraction(tmp_path: Path) -> None:
    runs = [_run(tmp_path, 0.25, 0.05), _run(tmp_path, 1.0, -0.02)]
    table = summarise(runs)
    row = table[(table["arm"] == "consistency-mask") & (table["fraction"] == 0.25)].iloc[0]
    assert row["dice_minus_plain"] == pytest.approx(0.05)
    assert row["dice_p_vs_plain"] < 0.01  # every image better by the same amount
    assert row["seeds"] == 2 and row["auc"] == pytest.approx(1.0)
    plain = table[(table["arm"] == "multitask") & (table["fraction"] == 1.0)].iloc[0]
    assert plain["dice"] == pytest.approx(0.5 + 0.02 * 5.5 + 0.005)
    later = table[(table["arm"] == "consistency-mask") & (table["fraction"] == 1.0)].iloc[0]
    assert later["dice_minus_plain"] == pytest.approx(-0.02)


def test_main_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    runs = [_run(tmp_path, 0.1, 0.0), _run(tmp_path, 0.5, 0.01)]
    assert main([*map(str, runs), "--out", str(tmp_path / "out" / "mf")]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "mf.csv")) == 4
    assert (tmp_path / "out" / "mf.png").stat().st_size > 0


def test_folders_of_one_fraction_merge_and_a_duplicate_or_missing_plain_arm_is_refused(tmp_path: Path) -> None:
    first = _run(tmp_path, 0.1, 0.0)
    later = _run(tmp_path, 0.1, 0.03, arms=("consistency-both",), name="b")
    table = summarise([first, later])
    both = table[table["arm"] == "consistency-both"].iloc[0]
    assert both["dice_minus_plain"] == pytest.approx(0.03)  # paired with the other folder's plain arm
    with pytest.raises(SystemExit, match="also in"):
        summarise([first, _run(tmp_path, 0.1, 0.0, name="dup")])
    with pytest.raises(SystemExit, match="no multitask arm"):
        summarise([_run(tmp_path, 0.5, 0.0, arms=("consistency-both",))])
