"""server/report.py: report.md, plots and the per-round summary line from a hand-made metrics.csv."""
from __future__ import annotations

import io
import json
from pathlib import Path

from launch.audit import AuditLog
from server.report import PLOTS, RunMetrics, eta_seconds, format_eta, summary_line, write_report
from server.run_watcher import RunFolderWatcher

HEADER = "round,phase,site,metric,value\n"


def _rows(rnd: int, busi: tuple[float, float, float, float], udiat: str) -> str:
    """One round: busi trains (loss, dice, auc, ε); udiat 'ok' (fixed values), 'rejected' or 'failed'."""
    loss, dice, auc, eps = busi
    out = [f"{rnd},train,busi,train_loss,{loss}", f"{rnd},train,busi,epsilon,{eps}",
           f"{rnd},evaluate,busi,dice,{dice}", f"{rnd},evaluate,busi,auc,{auc}",
           f"{rnd},evaluate,busi,n_images,20.0"]
    if udiat == "ok":
        out += [f"{rnd},train,udiat,train_loss,0.9", f"{rnd},train,udiat,epsilon,-1.0",
                f"{rnd},evaluate,udiat,dice,0.3", f"{rnd},evaluate,udiat,auc,-1.0",
                f"{rnd},evaluate,udiat,n_images,10.0"]
    elif udiat == "rejected":
        out += [f"{rnd},train,udiat,rejected,1.0", f"{rnd},train,udiat,rejected_norm,1.0",
                f"{rnd},evaluate,udiat,dice,0.2"]
    else:
        out += [f"{rnd},train,udiat,failed,1.0"]
    out += [f"{rnd},train,all-sites,train_loss,{loss}", f"{rnd},train,all-sites,sites_ok,1.0",
            f"{rnd},evaluate,all-sites,dice,{dice}", f"{rnd},evaluate,all-sites,auc,{auc}",
            f"{rnd},train,all-sites,wall_seconds,50.0", f"{rnd},evaluate,all-sites,wall_seconds,10.0"]
    return "\n".join(out) + "\n"


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(HEADER + _rows(1, (0.8, 0.4, 0.6, 1.5), "ok")
                                     + _rows(2, (0.5, 0.55, 0.7, 2.25), "rejected"))
    (run / "config.yaml").write_text("experiment:\n  federation:\n    rounds: 5\n")
    (run / "status.json").write_text(json.dumps({"state": "running", "round": 2, "message": ""}))
    return run


def test_summary_line_shows_each_site_status_global_and_eta(tmp_path: Path) -> None:
    m = RunMetrics.read(_run(tmp_path) / "metrics.csv")
    assert m.rounds == [1, 2] and m.sites() == ["busi", "udiat"]
    assert eta_seconds(m, 2, 5) == 180.0  # 60 s per round, 3 to go
    assert format_eta(180.0) == "03:00" and format_eta(None) == "--:--"
    assert summary_line(m, 1, 5, 240.0) == (
        "round 1/5: busi loss 0.8 dice 0.40 auc 0.60 ε 1.50 ok; udiat loss 0.9 dice 0.30 ok; "
        "global dice 0.40 auc 0.60; ETA 04:00")
    assert summary_line(m, 2, 5, eta_seconds(m, 2, 5)) == (
        "round 2/5: busi loss 0.5 dice 0.55 auc 0.70 ε 2.25 ok; udiat dice 0.20 rejected (norm); "
        "global dice 0.55 auc 0.70; ETA 03:00")


def test_report_has_site_table_problems_and_plots(tmp_path: Path) -> None:
    run = _run(tmp_path)
    path = write_report(run)
    text = path.read_text()
    assert "State: **running**, round 2/5" in text
    assert "| site | status | train loss | dice | auc | images | ε |" in text
    assert "| busi | ok | 0.500 | 0.550 | 0.700 | 20 | 2.25 |" in text
    assert "| udiat | rejected | – | 0.200 | – | – | – |" in text
    assert "| 2 | 0.500 | 0.550 | 0.700 | 1 | 60.0 |" in text  # global row of round 2
    assert "| 2 | udiat | rejected | norm |" in text
    for name in PLOTS.values():  # every plot has data here (ε from busi, a rejection in round 2)
        png = run / name
        assert png.is_file() and png.stat().st_size > 1024, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_report_without_dp_or_rounds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert "No round has finished yet." in write_report(run, total=3).read_text()
    (run / "metrics.csv").write_text(HEADER + _rows(1, (0.8, 0.4, 0.6, -1.0), "failed"))
    text = write_report(run, total=3).read_text()
    assert "ε" not in text and not (run / PLOTS["epsilon"]).exists()  # DP off: no ε column or plot
    assert "| 1 | udiat | failed | – |" in text


def test_watcher_prints_summaries_and_rewrites_report_at_the_end(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = io.StringIO()
    watcher = RunFolderWatcher(run, AuditLog(tmp_path / "audit.jsonl"), run_id=1, console=out)
    watcher.poll()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 1/5", "round 2/5"]
    assert lines[1].endswith("ETA 03:00")
    assert "State: **running**" in (run / "report.md").read_text()
    (run / "status.json").write_text(json.dumps({"state": "finished", "round": 2, "message": "done"}))
    watcher.poll()  # no new round, but the run ended: the report says so
    assert "State: **finished**, round 2/5 — done" in (run / "report.md").read_text()
    assert len(out.getvalue().splitlines()) == 2  # no summary repeated
