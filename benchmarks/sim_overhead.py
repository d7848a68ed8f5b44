"""Federation overhead on Flower's simulation engine: round wall time against local compute.

Runs the real apps through ``sim.federated.run_simulation_spec`` (exactly what
``python -m sim.leave_center_out`` runs for a federated unit) on synthetic centres with the
settings of ``--preset``/``--set`` (default ``cpu-fast``, the simulation's default on synthetic
centres: 64 px, small U-Net base 16 depth 3, batch 8, 4 rounds of 2 local epochs,
``sim.synthetic_n`` = 48 cases per site; ``--quick``: ``smoke`` with 2 rounds), 3 training sites,
every site in every round, no central test set, one thread per site. Per round, from the
server's metrics.csv:

    wall      = train-phase wall time + evaluate-phase wall time (measured by the ServerApp)
    slowest   = slowest site's train seconds + slowest site's evaluate seconds
    bound     = per phase max(slowest site, sum over sites / workers), summed over the phases:
                the shortest possible round when W = Ray workers run the sites (3 sites on
                2 workers cannot finish in one site's time)
    ratio     = wall / slowest (the issue's measure); ratio_bound = wall / bound

A site's seconds are ``train_local``'s loop (resp. evaluation) only; everything else on the
critical path (model build, optimizer construction, messages, polling, aggregation, checkpoint)
is overhead. Round 1 also carries the Ray workers' start-up and first imports and is reported
separately. Peak memory: RSS summed over this process and all descendants (Ray).

    python benchmarks/sim_overhead.py [--sites 3] [--optimizer-ab] [--quick]
        [--preset NAME|FILE] [--set federation.rounds=6 ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from benchmarks.perfutil import (  # noqa: E402
    OUT_DIR, PeakMemory, add_settings_args, format_table, machine_note, settings_from_args, write_csv,
)
from common.config import replace  # noqa: E402
from common.data.synthetic import SYNTHETIC_CENTRES  # noqa: E402
from common.federation import AGGREGATE_SITE, RunSpec, SiteSpec  # noqa: E402
from common.settings import Settings  # noqa: E402

DEFAULT_PRESET = "cpu-fast"  # the simulation's default on its synthetic centres
QUICK_PRESET = "smoke"
QUICK_SET = ("federation.rounds=2",)  # round 1 carries the start-up: one later round at least


def build_spec(run_dir: Path, sites: int, settings: Settings) -> RunSpec:
    """The federation this benchmark times: the settings' experiment and federation with every
    site in every round (quorum = ``sites``), no central test set and one thread per site;
    ``sites`` synthetic sites of ``sim.synthetic_n`` cases, cycling through the centres."""
    exp = settings.experiment
    exp = replace(exp, train=replace(exp.train, progress=False, num_threads=1))
    fed = replace(settings.federation, min_sites=sites, central_eval=False)
    names = list(SYNTHETIC_CENTRES)
    n = settings.sim.synthetic_n
    specs = tuple(SiteSpec(name=f"site{i:03d}", synthetic_centre=names[i % len(names)], synthetic_n=n)
                  for i in range(sites))
    return RunSpec(experiment=exp, federation=fed, sites=specs, run_dir=str(run_dir))


def makespan_bound(times: list[float], workers: int) -> float:
    """Lower bound of the time ``workers`` identical workers need for indivisible jobs:
    max(longest job, total / workers, and with more jobs than workers the W-th plus the
    (W+1)-th longest, two of which must share a worker). Exact for 3 jobs on 2 workers."""
    t = sorted(times, reverse=True)
    bound = max(t[0], sum(t) / workers)
    if len(t) > workers:
        bound = max(bound, t[workers - 1] + t[workers])
    return bound


def round_table(metrics_csv: Path, workers: int) -> list[dict]:
    """Per-round timing rows (see the module docstring) from a server metrics.csv."""
    m = pd.read_csv(metrics_csv)
    out = []
    for rnd, g in m.groupby("round"):
        row: dict = {"round": int(rnd)}
        bound = slowest = 0.0
        for phase in ("train", "evaluate"):
            wall = g[(g.site == AGGREGATE_SITE) & (g.phase == phase) & (g.metric == "wall_seconds")]["value"]
            secs = g[(g.site != AGGREGATE_SITE) & (g.phase == phase) & (g.metric == "seconds")]["value"]
            row[f"{phase}_wall_s"] = float(wall.iloc[0])
            row[f"{phase}_slowest_s"] = float(secs.max())
            slowest += float(secs.max())
            bound += makespan_bound(secs.tolist(), workers)
        row["wall_s"] = row["train_wall_s"] + row["evaluate_wall_s"]
        row["slowest_site_s"] = slowest
        row["bound_s"] = bound
        row["overhead_s"] = row["wall_s"] - slowest
        row["ratio"] = row["wall_s"] / slowest
        row["ratio_bound"] = row["wall_s"] / bound
        out.append(row)
    return out


def stamped_client_app(inner: Any, stamp_file: str, stock_optimizer: bool = False) -> Any:
    """``inner`` ClientApp wrapped to append one JSON line per message (round, kind, site
    partition, handler start/end epoch seconds) to ``stamp_file``: what the site's process
    spent per message, against which the engine's dispatch and return are the rest.
    ``stock_optimizer``: the site trains with torch.optim's own classes (``common.optim.eager``
    replaced by the identity in the site's process), i.e. as before that change."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def handler(msg: Any, context: Any) -> Any:
        if stock_optimizer:
            import common.optim

            common.optim.eager = lambda cls: cls
        t0 = time.time()
        out = inner(message=msg, context=context)
        t1 = time.time()
        config = msg.content.config_records.get("config")
        rnd = int(config.get("server-round", 0)) if config is not None else 0
        with open(stamp_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"round": rnd, "kind": msg.metadata.message_type,
                                 "partition": int(context.node_config.get("partition-id", -1)),
                                 "start": t0, "end": t1}) + "\n")
        return out

    app.query()(handler)
    app.train()(handler)
    app.evaluate()(handler)
    return app


def run_once(spec: RunSpec, num_cpus: float, stamp_file: Path | None = None,
             stock_optimizer: bool = False) -> tuple[float, PeakMemory]:
    """Run ``spec`` through ``sim.federated.run_simulation_spec``; with ``stamp_file`` the
    ClientApp it builds is wrapped by ``stamped_client_app`` (nothing else changes)."""
    import client.app as client_app

    try:
        from sim.federated import run_simulation_spec
    except ImportError:  # before sim/federated.py split it out of sim/protocols.py
        from sim.protocols import run_simulation_spec  # type: ignore[no-redef]

    original = client_app.make_client_app
    if stamp_file is not None:
        client_app.make_client_app = lambda s=None: stamped_client_app(original(s), str(stamp_file),
                                                                       stock_optimizer)
    t0 = time.perf_counter()
    try:
        with PeakMemory() as mem:
            run_simulation_spec(spec, num_cpus=num_cpus)
    finally:
        client_app.make_client_app = original
    return time.perf_counter() - t0, mem


def handler_overhead(stamp_file: Path, metrics_csv: Path, sites: list[str]) -> dict[int, dict[str, float]]:
    """Per round: mean over messages of (handler wall − the site's reported seconds) for train
    and evaluate, i.e. our client code outside the training/evaluation loop."""
    stamps = pd.read_json(stamp_file, lines=True)
    m = pd.read_csv(metrics_csv)
    secs = m[(m.metric == "seconds") & (m.site != AGGREGATE_SITE)].set_index(["round", "phase", "site"])["value"]
    out: dict[int, dict[str, float]] = {}
    for _, s in stamps.iterrows():
        phase = {"train": "train", "evaluate": "evaluate"}.get(str(s.kind))
        if phase is None or s["round"] < 1:
            continue
        key = (int(s["round"]), phase, sites[int(s.partition)])
        if key in secs.index:
            rec = out.setdefault(int(s["round"]), {"train": [], "evaluate": []})
            rec[phase].append(float(s.end - s.start) - float(secs[key]))
    return {r: {f"{p}_client_extra_s": sum(v) / len(v) for p, v in d.items() if v} for r, d in out.items()}


def summarise(rows: list[dict]) -> dict:
    later = [r for r in rows if r["round"] > 1] or rows[-1:]
    mean = lambda k: sum(r[k] for r in later) / len(later) if later else float("nan")  # noqa: E731
    return {"round1_wall_s": rows[0]["wall_s"], "round1_ratio": rows[0]["ratio"],
            "later_wall_s": mean("wall_s"), "later_slowest_s": mean("slowest_site_s"),
            "later_overhead_s": mean("overhead_s"),
            "later_client_extra_s": mean("train_client_extra_s") + mean("evaluate_client_extra_s"),
            "later_ratio": mean("ratio"),
            "later_ratio_bound": mean("ratio_bound")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET)
    p.add_argument("--sites", type=int, default=3, help="training sites (default 3: the LCO federation)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per simulated site")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_PRESET} (unless --preset) with --set {' '.join(QUICK_SET)}: 32 px, tiny "
                        "model, 24 cases, 2 rounds of 1 epoch")
    p.add_argument("--optimizer-ab", action="store_true",
                   help="run twice: our optimizer (no torch._dynamo import) and torch.optim's stock classes")
    p.add_argument("--out", type=Path, default=OUT_DIR / "sim_overhead.csv")
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args(argv)
    settings = settings_from_args(args, QUICK_SET, QUICK_PRESET) if args.quick else settings_from_args(args)
    logging.basicConfig(level=logging.WARNING)
    for name in ("flwr", "server", "client", "common", "sim"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sim_overhead-"))
    workers = max(1, int((os.cpu_count() or 1) // args.num_cpus))
    print(machine_note())
    variants = [("eager", False), ("stock", True)] if args.optimizer_ab else [("eager", False)]
    all_rows, summaries = [], []
    for variant, stock in variants:
        spec = build_spec(work / f"run-{variant}-{time.strftime('%H%M%S')}", args.sites, settings)
        stamps = Path(spec.run_dir).with_name(f"client_stamps-{variant}.jsonl")
        t0 = time.time()
        total, mem = run_once(spec, args.num_cpus, stamps, stock_optimizer=stock)
        metrics_csv = Path(spec.run_dir) / "metrics.csv"
        rows = round_table(metrics_csv, workers)
        extra = handler_overhead(stamps, metrics_csv, [s.name for s in spec.sites])
        first_query = min(json.loads(line)["start"] for line in stamps.read_text().splitlines())
        common = {"optimizer": variant, "sites": args.sites, "workers": workers,
                  "size": spec.experiment.data.image_size, "synthetic_n": settings.sim.synthetic_n,
                  "local_epochs": spec.federation.local_epochs}
        for r in rows:
            r.update(extra.get(r["round"], {}))
            r.update(common)
        summaries.append({**common, "rounds": spec.federation.rounds, "total_wall_s": total,
                          "startup_s": first_query - t0, **summarise(rows),
                          "peak_rss_mib": mem.peak_mib, "peak_procs": mem.peak_procs})
        all_rows += rows
        print(f"optimizer {variant}:")
        print(format_table(rows, ["round", "train_wall_s", "train_slowest_s", "evaluate_wall_s",
                                  "evaluate_slowest_s", "wall_s", "slowest_site_s", "bound_s",
                                  "overhead_s", "train_client_extra_s", "evaluate_client_extra_s",
                                  "ratio", "ratio_bound"]))
        print()
    print(format_table(summaries, ["optimizer", "sites", "workers", "size", "total_wall_s", "startup_s",
                                   "round1_wall_s", "round1_ratio", "later_wall_s", "later_slowest_s",
                                   "later_overhead_s", "later_client_extra_s", "later_ratio",
                                   "later_ratio_bound", "peak_rss_mib", "peak_procs"]))
    if len(summaries) == 2:
        e, s_ = summaries
        print(f"\nround 1 wall, eager / stock optimizer: {e['round1_wall_s'] / s_['round1_wall_s']:.3f} "
              f"({e['round1_wall_s']:.2f} s vs {s_['round1_wall_s']:.2f} s); later rounds "
              f"{e['later_wall_s'] / s_['later_wall_s']:.3f}")
    write_csv(all_rows, args.out)
    write_csv(summaries, args.out.with_name(args.out.stem + "_summary.csv"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
