"""benchmarks/perf_channels_last.py --quick: every arm runs and each ratio is a positive number."""
import pandas as pd

from benchmarks.perf_channels_last import main


def test_quick_run_writes_three_ratios(tmp_path):
    out = tmp_path / "pcl.csv"
    assert main(["--quick", "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 3 and rows["measure"].str.contains("channels-last").all()
    assert (rows["value"] > 0).all()
