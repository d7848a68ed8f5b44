"""benchmarks/perf_channels_last.py --quick: every arm runs; each ratio (three formats, one fold,
the half mask head in training and TTA scoring) is positive."""
import pandas as pd

from benchmarks.perf_channels_last import main


def test_quick_run_writes_six_ratios(tmp_path):
    out = tmp_path / "pcl.csv"
    assert main(["--quick", "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 6 and rows["measure"].str.contains("channels-last").sum() == 3
    assert rows["measure"].str.contains("folded").sum() == 1
    assert rows["measure"].str.contains("half").sum() == 2
    assert (rows["value"] > 0).all()
