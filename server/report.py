"""The operator's view of a deployment run: ``report.md`` plus PNG plots in the run folder, and a
one-line console summary per round, both from the run folder's ``metrics.csv`` (server/state.py
layout: round, phase, site, metric, value; schemas in common/federation.py). The section on the
learned BI-RADS prior and its plot come from the ``prior`` rows (server/report_prior.py).

Read with the csv module, not server.state, and matplotlib is imported only when plots are
drawn: the coordinator imports this module and must stay free of torch and pandas
(tests/test_light_imports.py).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.atomic import atomic_write
from common.federation import AGGREGATE_SITE
from server.report_prior import PRIOR_PLOT, prior_section, prior_series
from server.run_metrics import RunMetrics

log = logging.getLogger(__name__)

REPORT = "report.md"
PLOTS = {"dice": "report_dice.png", "auc": "report_auc.png", "loss": "report_loss.png",
         "epsilon": "report_epsilon.png", "wall": "report_wall.png", "rejected": "report_rejected.png"}
_DPI = 100


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_eta(seconds: float | None) -> str:
    """mm:ss (hours folded into minutes), or '--:--' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = max(0, int(round(seconds)))
    return f"{s // 60:02d}:{s % 60:02d}"


def eta_seconds(m: RunMetrics, rnd: int, total: int | None, after_round: int = 0) -> float | None:
    """Mean wall time of the rounds of this run so far times the rounds still to go."""
    if total is None:
        return None
    times = [t for r in m.rounds if after_round < r <= rnd and (t := m.round_seconds(r)) is not None]
    return (sum(times) / len(times)) * max(total - rnd, 0) if times else None


def summary_line(m: RunMetrics, rnd: int, total: int | None = None, eta: float | None = None) -> str:
    """'round 2/5: busi loss 0.41 dice 0.62 auc 0.80 ok; udiat rejected (norm); global dice 0.60
    auc 0.79; ETA 01:30' (ε shown for a site whose DP accountant reported one)."""
    parts = []
    for site in m.sites():
        status = m.status(rnd, site)
        if status == "absent":
            continue
        fields = [site]
        for label, phase, metric in (("loss", "train", "train_loss"), ("dice", "evaluate", "dice"),
                                     ("auc", "evaluate", "auc"), ("ε", "train", "epsilon")):
            v = m.get(rnd, phase, site, metric)
            if v is not None:
                fields.append(f"{label} {v:.2f}" if label != "loss" else f"{label} {v:.3g}")
        why = m.reasons(rnd, site)
        fields.append(status + (f" ({', '.join(why)})" if status == "rejected" and why else ""))
        parts.append(" ".join(fields))
    dice, auc = (m.get(rnd, "evaluate", AGGREGATE_SITE, k) for k in ("dice", "auc"))
    parts.append(f"global dice {_fmt(dice, 2)} auc {_fmt(auc, 2)}")
    head = f"round {rnd}/{total}" if total else f"round {rnd}"
    return f"{head}: {'; '.join(parts)}; ETA {format_eta(eta)}"


# ------------------------------------------------------------------ report.md
def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(m: RunMetrics, total: int | None, status: dict[str, Any], plots: Sequence[str]) -> str:
    """The report text: state, the latest round per site, global metrics per round, problems."""
    last = m.rounds[-1] if m.rounds else 0
    dp = any(m.get(r, "train", s, "epsilon") is not None for r in m.rounds for s in m.sites())
    lines = ["# Federated run report", ""]
    state = status.get("state", "unknown")
    lines += [f"State: **{state}**, round {last}/{total if total else '?'}"
              + (f" — {status['message']}" if status.get("message") else ""), ""]
    if not m.rounds:
        return "\n".join(lines + ["No round has finished yet.", ""])
    lines += [f"## Sites, round {last}", ""]
    head = ["site", "status", "train loss", "dice", "auc", "images"] + (["ε"] if dp else [])
    rows = []
    for site in m.sites(phase="train") + [s for s in m.sites() if s not in m.sites(phase="train")]:
        phase = "central" if (last, "central", site) in m.values else "evaluate"
        row = [site if phase != "central" else f"{site} (held out)",
               m.status(last, site) if phase != "central" else "–",
               _fmt(m.get(last, "train", site, "train_loss")), _fmt(m.get(last, phase, site, "dice")),
               _fmt(m.get(last, phase, site, "auc")), _fmt(m.get(last, phase, site, "n_images"), 0)]
        if dp:
            row.append(_fmt(m.get(last, "train", site, "epsilon"), 2))
        rows.append(row)
    lines += _table(head, rows) + ["", "## Global metrics per round", ""]
    central = any((r, "central", AGGREGATE_SITE) in m.values for r in m.rounds)
    head = ["round", "train loss", "dice", "auc"] + (["held-out dice", "held-out auc"] if central else [])
    head += ["sites ok", "wall s"]
    rows = []
    for r in m.rounds:
        row = [str(r), _fmt(m.get(r, "train", AGGREGATE_SITE, "train_loss")),
               _fmt(m.get(r, "evaluate", AGGREGATE_SITE, "dice")), _fmt(m.get(r, "evaluate", AGGREGATE_SITE, "auc"))]
        if central:
            row += [_fmt(m.get(r, "central", AGGREGATE_SITE, k)) for k in ("dice", "auc")]
        row += [_fmt(m.get(r, "train", AGGREGATE_SITE, "sites_ok"), 0), _fmt(m.round_seconds(r), 1)]
        rows.append(row)
    lines += _table(head, rows) + [""]
    problems = [(r, s, m.status(r, s)) for r in m.rounds for s in m.sites() if m.status(r, s) in ("failed", "rejected")]
    lines += ["## Failed and rejected updates", ""]
    if problems:
        lines += _table(["round", "site", "status", "checks"],
                        [[str(r), s, st, ", ".join(m.reasons(r, s)) or "–"] for r, s, st in problems])
    else:
        lines.append("None.")
    lines += ["", *prior_section(m, PRIOR_PLOT if PRIOR_PLOT in plots else None)]
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots if p != PRIOR_PLOT] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _plot_lines(path: Path, title: str, ylabel: str, series: list[tuple[str, list[int], list[float], bool]],
                ylim: tuple[float, float] | None = None) -> bool:
    """Line plot of (label, rounds, values, is_global) series; False when nothing to draw."""
    series = [s for s in series if s[1]]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, xs, ys, is_global in series:
        ax.plot(xs, ys, marker="o", label=label, linewidth=2.6 if is_global else 1.4,
                color="black" if is_global else None, linestyle="-" if is_global else "--")
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _plot_bars(path: Path, title: str, ylabel: str, rounds: list[int],
               stacks: list[tuple[str, list[float]]]) -> bool:
    if not rounds:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bottom = [0.0] * len(rounds)
    for label, values in stacks:
        ax.bar(rounds, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI, bbox_inches="tight"),
                     binary=True, mode=None)
    finally:
        plt.close(fig)


def draw_plots(m: RunMetrics, folder: Path) -> list[str]:
    """The PNGs that have data; returns their file names (relative to ``folder``)."""
    sites, train_sites = m.sites(phase="evaluate"), m.sites(phase="train")
    made = []

    def per_site(phase: str, metric: str, glob: bool = True) -> list[tuple[str, list[int], list[float], bool]]:
        out = [("global", *m.series(phase, AGGREGATE_SITE, metric), True)] if glob else []
        return out + [(s, *m.series(phase, s, metric), False) for s in (sites if phase == "evaluate" else train_sites)]

    for key, label in (("dice", "Dice"), ("auc", "AUC")):
        held = [(f"held-out {s}" if s != AGGREGATE_SITE else "held-out (all)", *m.series("central", s, key), False)
                for s in [AGGREGATE_SITE, *m.sites(phase="central")]]
        if _plot_lines(folder / PLOTS[key], f"{label} per round (site validation)", label,
                       per_site("evaluate", key) + held, (0.0, 1.0)):
            made.append(PLOTS[key])
    if _plot_lines(folder / PLOTS["loss"], "Training loss per round", "train loss", per_site("train", "train_loss")):
        made.append(PLOTS["loss"])
    if _plot_lines(folder / PLOTS["epsilon"], "Cumulative ε per site (DP-SGD)", "ε",
                   per_site("train", "epsilon", glob=False)):
        made.append(PLOTS["epsilon"])
    rounds = m.rounds
    walls = [[m.get(r, p, AGGREGATE_SITE, "wall_seconds") or 0.0 for r in rounds] for p in ("train", "evaluate")]
    if any(any(w) for w in walls) and _plot_bars(folder / PLOTS["wall"], "Round wall time", "seconds", rounds,
                                                 [("train", walls[0]), ("evaluate", walls[1])]):
        made.append(PLOTS["wall"])
    every = m.sites()
    counts = [[float(sum(m.status(r, s) == st for s in every)) for r in rounds] for st in ("rejected", "failed")]
    if _plot_bars(folder / PLOTS["rejected"], "Rejected and failed site updates", "sites", rounds,
                  [("rejected", counts[0]), ("failed", counts[1])]):
        made.append(PLOTS["rejected"])
    if _plot_lines(folder / PRIOR_PLOT, "Global BI-RADS prior: weight per feature", "logit per SD",
                   prior_series(m)):
        made.append(PRIOR_PLOT)
    return made


def total_rounds(folder: Path) -> int | None:
    """``experiment.federation.rounds`` of the run's config.yaml, when readable."""
    try:
        import yaml

        doc = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        return int(doc["experiment"]["federation"]["rounds"])
    except (OSError, KeyError, TypeError, ValueError, AttributeError, ImportError) as exc:
        log.debug("rounds unknown (%s)", exc)
        return None
    except Exception as exc:  # noqa: BLE001  a malformed YAML must not stop the report
        log.debug("rounds unknown (%s)", exc)
        return None


def _status(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "status.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return {}


def write_report(run_dir: str | Path, total: int | None = None, metrics: RunMetrics | None = None) -> Path:
    """(Re)write ``run_dir/report.md`` and its PNGs from metrics.csv; returns the report path.
    ``total``: the run's number of rounds (default: from config.yaml)."""
    folder = Path(run_dir)
    m = metrics if metrics is not None else RunMetrics.read(folder / "metrics.csv")
    total = total if total is not None else total_rounds(folder)
    plots = draw_plots(m, folder) if m.rounds else []
    text = render_markdown(m, total, _status(folder), plots)
    return atomic_write(folder / REPORT, lambda fh: fh.write(text), mode=None)
