"""fedbus-site-check CLI: exit codes 0 ok / 1 data errors / 2 usage, and no Flower import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from client.check import main
from tests.common.test_data_readers import make_busi

REPO = Path(__file__).resolve().parents[2]


def test_ok_site_exits_0(tmp_path, capsys):
    assert main(["--data", str(make_busi(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "format BUSI" in out and "cases: 5" in out and "result: OK" in out


def test_data_errors_exit_1_and_name_the_file(tmp_path, capsys):
    make_busi(tmp_path)
    (tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (9).png").write_bytes(b"junk")
    assert main(["--data", str(tmp_path), "--format", "BUSI"]) == 1
    out = capsys.readouterr().out
    assert "benign (9).png" in out and "FAILED" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--format", "dicom"]) == 2
    assert main([]) == 2
    assert main(["--data", str(tmp_path)]) == 2  # empty folder: layout not recognised
    assert "cannot recognise" in capsys.readouterr().err


def test_module_entry_point_without_flwr(tmp_path):
    make_busi(tmp_path)
    code = ("import sys, runpy; sys.argv=['x', '--data', sys.argv[1]]\n"
            "try:\n    runpy.run_module('client.check', run_name='__main__')\n"
            "except SystemExit as e:\n    assert 'flwr' not in sys.modules; sys.exit(e.code)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "result: OK" in proc.stdout
