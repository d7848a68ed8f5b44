"""Scale of the simulation: 10, 25, 50 virtual sites on this machine (synthetic data; default
the ``smoke`` settings: 32 px images, tiny U-Net, with 3 rounds and 12 cases per site), wall time
per round and peak memory; growth should be linear in sites.

Each point is its own process (a fresh Ray instance) running ``benchmarks/sim_overhead.py``'s
federation (every site trains and evaluates every round; the settings' strategy and local
epochs, loaded by the child from the resolved settings the parent writes) through
``sim.federated.run_simulation_spec``. Reported per point: start-up (Ray, workers, the query
round: process start to round 1), round-1 wall, mean wall of the later rounds, per-site
figures, and the peak RSS summed over the point's whole process tree (driver + Ray). The fit
is least squares of later-round wall and of peak memory against the number of sites; the
ratios per site (wall/sites at the largest point over wall/sites at the smallest) are ~1 when
growth is linear.

    python benchmarks/scale_sites.py [--sites 10,25,50] [--quick]
        [--preset NAME|FILE] [--set federation.rounds=4 ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perfutil import (  # noqa: E402
    OUT_DIR, PeakMemory, add_settings_args, format_table, settings_from_args, write_csv, write_settings,
)
from common.settings import Settings  # noqa: E402

DEFAULT_PRESET = "smoke"
DEFAULT_SET = ("federation.rounds=3", "sim.synthetic_n=12")
QUICK_SET = ("federation.rounds=2",)


def child(sites: int, settings: Settings, out: Path) -> None:
    """One point: run the federation and write its timing rows as JSON to ``out``."""
    import logging
    import os

    from benchmarks.sim_overhead import build_spec, round_table, run_once

    logging.basicConfig(level=logging.WARNING)
    for name in ("flwr", "server", "client", "common", "sim"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"scale{sites}-"))
    spec = build_spec(work / "run", sites, settings)
    stamps = work / "client_stamps.jsonl"
    t0 = time.time()
    total, _mem = run_once(spec, 1.0, stamps)
    rows = round_table(work / "run" / "metrics.csv", max(1, os.cpu_count() or 1))
    first_query = min(json.loads(line)["start"] for line in stamps.read_text().splitlines())
    out.write_text(json.dumps({"rows": rows, "total_s": total, "startup_s": first_query - t0}))


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return slope, my - slope * mx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET, DEFAULT_SET)
    p.add_argument("--sites", default="10,25,50", help="comma list of site counts")
    p.add_argument("--quick", action="store_true", help="2 and 6 sites, --set federation.rounds=2")
    p.add_argument("--out", type=Path, default=OUT_DIR / "scale_sites.csv")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = settings_from_args(args, QUICK_SET if args.quick else ())
    if args.child:
        child(args.child, settings, args.child_out)
        return 0
    counts = [2, 6] if args.quick else [int(s) for s in args.sites.split(",")]
    if settings.federation.rounds < 2:
        p.error("the later rounds are the measure: give federation.rounds >= 2")
    resolved = write_settings(settings, Path(tempfile.mkdtemp(prefix="scale_sites-")) / "settings.yaml")
    rows = []
    for sites in counts:
        out = resolved.with_name(f"point-{sites}.json")
        cmd = [sys.executable, __file__, "--child", str(sites), "--child-out", str(out),
               "--preset", str(resolved)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with PeakMemory(interval=0.2, root=proc.pid) as mem:
            _, err = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(err[-3000:], file=sys.stderr)
            raise SystemExit(f"{sites} sites: child failed ({proc.returncode})")
        res = json.loads(out.read_text())
        out.unlink()
        later = [r for r in res["rows"] if r["round"] > 1]
        later_wall = sum(r["wall_s"] for r in later) / len(later)
        rows.append({
            "sites": sites, "process_s": wall, "startup_s": res["startup_s"],
            "round1_wall_s": res["rows"][0]["wall_s"], "round_wall_s": later_wall,
            "round_wall_per_site_s": later_wall / sites,
            "round_compute_s": sum(r["bound_s"] for r in later) / len(later),
            "ratio_bound": sum(r["ratio_bound"] for r in later) / len(later),
            "peak_rss_mib": mem.peak_mib, "peak_procs": mem.peak_procs,
        })
        print(f"{sites} sites: later rounds {later_wall:.2f} s, peak {mem.peak_mib:.0f} MiB "
              f"({mem.peak_procs} processes), process {wall:.0f} s", flush=True)
    shutil.rmtree(resolved.parent, ignore_errors=True)
    xs = [float(r["sites"]) for r in rows]
    slope_t, icpt_t = fit(xs, [r["round_wall_s"] for r in rows])
    slope_m, icpt_m = fit(xs, [r["peak_rss_mib"] for r in rows])
    for r in rows:
        r["wall_fit_residual"] = r["round_wall_s"] - (icpt_t + slope_t * r["sites"])
    print(format_table(rows, ["sites", "startup_s", "round1_wall_s", "round_wall_s", "round_wall_per_site_s",
                              "round_compute_s", "ratio_bound", "peak_rss_mib", "peak_procs", "process_s"]))
    lo, hi = rows[0], rows[-1]
    summary = {
        "round_wall_slope_s_per_site": slope_t, "round_wall_intercept_s": icpt_t,
        "memory_slope_mib_per_site": slope_m, "memory_intercept_mib": icpt_m,
        "per_site_wall_ratio_largest_vs_smallest": hi["round_wall_per_site_s"] / lo["round_wall_per_site_s"],
        "max_abs_fit_residual_s": max(abs(r["wall_fit_residual"]) for r in rows),
    }
    print()
    print(format_table([summary]))
    write_csv(rows, args.out)
    write_csv([summary], args.out.with_name(args.out.stem + "_fit.csv"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
