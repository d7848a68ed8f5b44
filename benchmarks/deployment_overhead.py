"""Per-round deployment overhead of stock Flower 1.41 versus our launchers, in one run.

A real SuperLink and three real SuperNodes on 127.0.0.1 (TLS + node authentication), synthetic
data and a tiny model, driven through flower-server / flower-client. The experiment is a
settings document (``--preset``/``--set``, default ``smoke`` with 4 rounds, batch 8, a quarter
of each site's images for validation, no augmentation) written into the run spec's
``experiment:``, with the measurement's fixed conditions on top: the three sites in every round,
no central test set, one CPU thread per site. For every round:

    overhead = (train-phase wall time + evaluate-phase wall time, measured by the ServerApp)
               - (slowest site's train seconds + slowest site's evaluate seconds)

i.e. everything that is not local computation on the critical path: polling, process start-up,
imports, data loading, (de)serialisation, TLS. Round 1 is reported but left out of the mean
(first contact: FAB download, caches).

    python benchmarks/deployment_overhead.py [--modes stock,ours] [--work-dir DIR]
        [--preset NAME|FILE] [--set federation.rounds=6 ...]

Modes: stock (stock SuperExec + per-message flwr-clientapp, SQLite state and payloads, one
object per tensor), ours (warm worker, short polls, SQLite state, payloads in memory, weights
packed into one vector per message), ours-unpacked (ours with one object per tensor),
ours-sqlite-payloads (ours with payloads in SQLite too), ours-memory (ours with all SuperLink
state in memory). ``--model preset`` uses the settings' own network (``smoke``: small U-Net,
base 8, depth 3) instead of the tiny one (base 4, depth 2: 41 tensors). Rows go to ``--out``
(CSV).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perfutil import add_settings_args, settings_source  # noqa: E402
from common.config import ConfigError  # noqa: E402
from common.federation import spec_from_dict  # noqa: E402
from common.settings import merge, parse_overrides  # noqa: E402
from launch.flwr_env import flwr_env  # noqa: E402
from launch.process import ManagedProcess, bin_path, free_port  # noqa: E402

SITES = {"udiat": "SynES1", "busi": "SynEG", "bus-uclm": "SynES2"}  # synthetic stand-ins
DEFAULT_PRESET = "smoke"
DEFAULT_SET = ("federation.rounds=4", "train.batch_size=8", "data.val_fraction=0.25", "data.augment=false")
TINY_MODEL = ("model.base_channels=4", "model.depth=2")
#: What every mode runs under, whatever the settings: all sites each round, no central test set
#: (the overhead is the sites' round trip), one thread per site, no progress bars in the logs.
FIXED = {"train": {"device": "cpu", "num_threads": 1, "progress": False},
         "federation": {"min_sites": len(SITES), "quorum_timeout_s": 120, "round_timeout_s": 300,
                        "central_eval": False}}
MODES = {  # coordinator settings; sites use tuning.fast = settings["fast"]
    "stock": {"fast": False, "database": "state.db", "payloads_in_memory": False, "packed": False},
    "ours": {"fast": True, "database": "state.db", "payloads_in_memory": True, "packed": True},
    "ours-unpacked": {"fast": True, "database": "state.db", "payloads_in_memory": True, "packed": False},
    "ours-sqlite-payloads": {"fast": True, "database": "state.db", "payloads_in_memory": False, "packed": True},
    "ours-memory": {"fast": True, "database": ":memory:", "payloads_in_memory": True, "packed": True},
}


def _pki(root: Path) -> Path:
    spec = importlib.util.spec_from_file_location("fedbus_pki", REPO / "deploy" / "pki.py")
    pki = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(pki)
    pki.make_ca(root)
    pki.make_server_cert(root, root, [], [])
    for name in SITES:
        pki.make_site_key(name, root / "keys")
    return root


def experiment_doc(preset: str, items: list[str], mode: str) -> dict[str, Any]:
    """The run spec's ``experiment:`` settings document: ``preset`` (a file made absolute, as the
    spec lives elsewhere), the ``--set`` items, then FIXED and the mode's weight packing."""
    if Path(preset).is_file():
        preset = str(Path(preset).resolve())
    fixed = merge(FIXED, {"federation": {"packed_weights": MODES[mode]["packed"]}})
    return {"preset": preset, **merge(parse_overrides(items), fixed)}


def run_spec(experiment: dict[str, Any], images: int, run_dir: Path) -> dict[str, Any]:
    """The RunSpec document flower-server reads: the experiment and the three synthetic sites."""
    return {"experiment": experiment,
            "sites": [{"name": n, "synthetic_centre": c, "synthetic_n": images} for n, c in SITES.items()],
            "run_dir": str(run_dir)}


def run_mode(mode: str, root: Path, pki: Path, experiment: dict[str, Any], images: int, timeout: float,
             app_dir: Path | None = None) -> list[dict]:
    """One federation run in ``mode`` of ``experiment`` (``experiment_doc``); returns per-round
    timing rows."""
    root.mkdir(parents=True)
    port, settings = free_port(), MODES[mode]
    run_dir = root / "run"
    (root / "experiment.yaml").write_text(yaml.safe_dump(run_spec(experiment, images, run_dir), sort_keys=False))
    (root / "coordinator.yaml").write_text(yaml.safe_dump({
        "port": port, "state_dir": str(root / "coordinator"), "database": settings["database"],
        "fast": settings["fast"], "payloads_in_memory": settings["payloads_in_memory"],
        "tls": {"ca_cert": str(pki / "ca.crt"), "server_cert": str(pki / "server.pem"),
                "server_key": str(pki / "server.key")},
        "sites": {n: str(pki / "keys" / f"{n}.pub") for n in SITES},
        **({"app_dir": str(app_dir)} if app_dir else {})}))
    env = flwr_env(extra={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    procs: list[ManagedProcess] = []
    try:
        server = ManagedProcess(f"{mode}-server", [bin_path("flower-server"), "--quiet", "--config",
                                str(root / "experiment.yaml"), "--deploy", str(root / "coordinator.yaml")],
                                root / "server.out", env=env).start()
        procs.append(server)
        deadline = time.monotonic() + 120
        while "registered site bus-uclm" not in server.tail(200) and time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"flower-server exited:\n{server.tail()}")
            time.sleep(0.5)
        for name, centre in SITES.items():
            (root / f"{name}.yaml").write_text(yaml.safe_dump({
                "site": name, "superlink": f"127.0.0.1:{port}", "ca_cert": str(pki / "ca.crt"),
                "private_key": str(pki / "keys" / name), "state_dir": str(root / "sites" / name),
                "data": {"synthetic_centre": centre, "synthetic_n": images},
                "runtime_port": free_port(), "device": "cpu", "num_threads": 1,
                "tuning": {"fast": settings["fast"], "reconnect_timeout_s": 120}}))
            procs.append(ManagedProcess(f"{mode}-{name}", [bin_path("flower-client"), "--quiet", "--site",
                                        name, "--config", str(root / f"{name}.yaml")],
                                        root / f"{name}.out", env=env).start())
        if server.wait(timeout) != 0:
            raise RuntimeError(f"{mode}: flower-server did not complete:\n{server.tail(60)}")
    finally:
        for proc in reversed(procs):
            proc.stop(10.0)
    return round_timings(run_dir / "metrics.csv")


def round_timings(metrics_csv: Path) -> list[dict]:
    with metrics_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for rnd in sorted({int(r["round"]) for r in rows}):
        mine = [r for r in rows if int(r["round"]) == rnd]

        def wall(phase: str) -> float:
            return sum(float(r["value"]) for r in mine
                       if r["phase"] == phase and r["site"] == "all-sites" and r["metric"] == "wall_seconds")

        def slowest(phase: str) -> float:
            return max((float(r["value"]) for r in mine
                        if r["phase"] == phase and r["site"] in SITES and r["metric"] == "seconds"), default=0.0)

        total, compute = wall("train") + wall("evaluate"), slowest("train") + slowest("evaluate")
        out.append({"round": rnd, "wall": total, "compute": compute, "overhead": total - compute})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET, DEFAULT_SET)
    p.add_argument("--images", type=int, default=16, help="synthetic images per site")
    p.add_argument("--modes", default="stock,ours")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=900.0, help="per mode, seconds")
    p.add_argument("--app-dir", type=Path, default=None, help="Flower app to submit (default: this repo)")
    p.add_argument("--model", choices=["tiny", "preset"], default="tiny",
                   help=f"tiny: --set {' '.join(TINY_MODEL)} before yours; preset: the settings' own network")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "deployment_overhead.csv")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: {sorted(MODES)}")
    preset, items = settings_source(args, TINY_MODEL if args.model == "tiny" else ())
    experiments = {mode: experiment_doc(preset, items, mode) for mode in modes}
    for mode, doc in experiments.items():  # every key and value checked before a process starts
        try:
            spec_from_dict(run_spec(doc, args.images, Path("run")), f"{mode} run spec")
        except ConfigError as exc:
            p.error(str(exc))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedbus-overhead-"))
    pki = _pki(work / "pki")
    means: dict[str, float] = {}
    all_rows: list[dict] = []
    for mode in modes:
        t0 = time.perf_counter()
        timings = run_mode(mode, work / mode, pki, experiments[mode], args.images, args.timeout,
                           args.app_dir)
        all_rows += [{"mode": mode, "model": args.model, **t} for t in timings]
        print(f"\n{mode}: {len(timings)} rounds in {time.perf_counter() - t0:.0f}s end to end")
        print(f"{'round':>5} {'wall s':>8} {'compute s':>10} {'overhead s':>11}")
        for t in timings:
            print(f"{t['round']:>5} {t['wall']:>8.2f} {t['compute']:>10.2f} {t['overhead']:>11.2f}")
        steady = [t["overhead"] for t in timings if t["round"] > 1] or [t["overhead"] for t in timings]
        means[mode] = statistics.mean(steady)
        print(f"mean overhead per round (rounds 2+): {means[mode]:.2f}s")
    if "stock" in means:
        for mode, value in means.items():
            if mode != "stock" and value > 0:
                print(f"\noverhead stock / {mode}: {means['stock']:.2f}s / {value:.2f}s = "
                      f"{means['stock'] / value:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["mode", "model", "round", "wall", "compute", "overhead"])
        writer.writeheader()
        writer.writerows(all_rows)
    print(f"\nrows: {args.out}\nwork folder (logs, run folders): {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
