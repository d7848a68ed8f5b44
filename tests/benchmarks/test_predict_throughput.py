"""benchmarks/predict_throughput.py on the smoke network: every engine × model × batch arm runs,
the reference's ratio is 1, and the ONNX file agrees with PyTorch within 1e-4."""
import csv

import pytest

from benchmarks.predict_throughput import main


def test_every_arm_runs_and_the_reference_ratio_is_one(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "pt.csv"
    assert main(["--preset", "smoke", "--images", "4", "--batch-sizes", "1", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    arms = {(r["engine"], r["model"], r["batch"]) for r in rows}
    assert arms == {(e, m, b) for e in ("pytorch", "onnxruntime") for m in ("single", "tta") for b in ("1", "2")}
    for r in rows:
        assert float(r["img_per_s"]) > 0 and float(r["ratio_vs_pytorch_single"]) > 0
        if (r["engine"], r["model"]) == ("pytorch", "single"):
            assert float(r["ratio_vs_pytorch_single"]) == 1.0
        if r["engine"] == "onnxruntime":
            assert 0 <= float(r["onnx_max_abs_diff"]) <= 1e-4
