"""report.md tables from hand-made tidy rows: rows, CIs, published numbers, Wilcoxon, matrix."""
from __future__ import annotations

import numpy as np
import pandas as pd

from sim.report import (
    ReportContext,
    build_report,
    centre_table,
    markdown_table,
    matrix_table,
    paired_comparison,
    published_column,
)


def _row(protocol, arm, train, test, metric, value, seed=0, n=10):
    return {"protocol": protocol, "arm": arm, "train_set": train, "test_centre": test, "seed": seed,
            "metric": metric, "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05, "n": n}


def _results() -> pd.DataFrame:
    rows = []
    for arm, base in (("seg_only", 0.5), ("multitask", 0.4), ("consistency", 0.7)):
        for test in ("UDIAT", "BUSI"):
            rows.append(_row("paper", arm, "BrEaST", test, "dice", base, n=8))
            rows.append(_row("paper", arm, "BrEaST", test, "iou", base - 0.1, n=8))
            rows.append(_row("paper", arm, "BrEaST", test, "hd95", 12.0, n=8))
            if arm != "seg_only":
                rows.append(_row("paper", arm, "BrEaST", test, "auc", 0.75, n=12))
    for train in ("BUSI", "UDIAT"):
        for test, v in (("BUSI", 0.8 if train == "BUSI" else 0.3), ("UDIAT", 0.6 if train == "UDIAT" else 0.2)):
            rows.append(_row("local", "consistency", train, test, "dice", v))
    return pd.DataFrame(rows)


def _per_image() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(12):
        base = rng.uniform(0.2, 0.6)
        has = i < 10
        for arm, shift in (("multitask", 0.0), ("consistency", 0.2)):
            rows.append({"protocol": "paper", "arm": arm, "train_set": "BrEaST", "seed": 0, "test_centre": "UDIAT",
                         "case_id": f"c{i}", "dice": base + shift if has else np.nan})
    return pd.DataFrame(rows)


def test_centre_table_rows_and_cells():
    table = centre_table(_results(), ["paper"], "UDIAT")
    assert list(table["arm"]) == ["consistency", "multitask", "seg_only"]  # sorted within a protocol
    row = table[table["arm"] == "consistency"].iloc[0]
    assert row["Dice (lesion imgs)"] == "0.700 [0.650, 0.750]"
    assert row["HD95 px"] == "12.0 [11.9, 12.1]"  # one decimal for distances
    assert row["n lesion / all"] == "8 / 12"
    seg = table[table["arm"] == "seg_only"].iloc[0]
    assert seg["AUC"] == "–" and seg["n lesion / all"] == "–"


def test_several_seeds_show_mean_and_sd():
    res = pd.DataFrame([_row("paper", "consistency", "BrEaST", "BUSI", "dice", v, seed=s)
                        for s, v in enumerate((0.6, 0.8))])
    cell = centre_table(res, ["paper"], "BUSI")["Dice (lesion imgs)"].iloc[0]
    assert cell == "0.700 ± 0.141 (2 seeds)"


def test_published_column_maps_arms():
    table = published_column(centre_table(_results(), ["paper"], "UDIAT"), "UDIAT")
    pub = dict(zip(table["arm"], table["published Dice"]))
    assert pub == {"consistency": "0.81", "multitask": "0.59", "seg_only": "–"}
    other = published_column(centre_table(_results(), ["paper"], "BUSI"), "BUSI")
    assert dict(zip(other["arm"], other["published Dice"]))["consistency"] == "0.66"


def test_paired_comparison_uses_lesion_images_only():
    table = paired_comparison(_per_image(), ("paper", "consistency"), ("paper", "multitask"))
    assert len(table) == 1
    row = table.iloc[0]
    assert row["pairs"] == 10  # two images without a lesion have NaN Dice and are dropped
    assert row["Δ (A−B)"] == "0.200"
    assert row["Wilcoxon p"] == "0.002"  # all 10 differences positive: exact two-sided p = 2/1024


def test_paired_comparison_empty_without_both_arms():
    pi = _per_image()
    assert paired_comparison(pi[pi["arm"] == "multitask"], ("paper", "consistency"), ("paper", "multitask")).empty


def test_matrix_table_is_train_by_test():
    mat = matrix_table(_results(), "local", "dice", "consistency")
    assert list(mat.index) == ["BUSI", "UDIAT"] and list(mat.columns) == ["BUSI", "UDIAT"]
    assert mat.loc["BUSI", "BUSI"] == 0.8 and mat.loc["BUSI", "UDIAT"] == 0.2


def test_markdown_table_shape():
    text = markdown_table(pd.DataFrame({"a": [1, 2], "b": ["x|y", "z"]}))
    lines = text.strip().splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|" and len(lines) == 4
    assert "x/y" in lines[2]


def test_build_report_sections():
    ctx = ReportContext(run_name="lco-test", data_source="synthetic",
                        centres=pd.DataFrame({"centre": ["UDIAT"], "images": [12]}),
                        settings={"epochs": 1}, selection_rule="last epoch",
                        figures=(("dice_box_paper.png", "Dice"),), synthetic=True)
    text = build_report(_results(), _per_image(), ctx)
    assert "# Leave-centre-out validation — lco-test" in text
    assert "Dice, IoU and HD95 are over lesion images only" in text
    assert "UDIAT 0.81 vs 0.59" in text and "Synthetic data" in text
    assert "#### Tested on UDIAT" in text and "#### Tested on BUSI" in text
    assert "### Consistency vs plain multi-task" in text
    assert "Local-only Dice (lesion images), arm consistency" in text
    assert "Protocol 2" not in text  # no federated rows
    assert "![Dice](dice_box_paper.png)" in text
