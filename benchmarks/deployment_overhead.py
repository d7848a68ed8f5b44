"""Per-round deployment overhead of stock Flower 1.41 versus our launchers, in one run.

A real SuperLink and three real SuperNodes on 127.0.0.1 (TLS + node authentication), synthetic
data and a tiny model, driven through flower-server / flower-client. For every round:

    overhead = (train-phase wall time + evaluate-phase wall time, measured by the ServerApp)
               - (slowest site's train seconds + slowest site's evaluate seconds)

i.e. everything that is not local computation on the critical path: polling, process start-up,
imports, data loading, (de)serialisation, TLS. Round 1 is reported but left out of the mean
(first contact: FAB download, caches).

    python benchmarks/deployment_overhead.py [--rounds 4] [--modes stock,ours] [--work-dir DIR]

Modes: stock (stock SuperExec + per-message flwr-clientapp, SQLite state and payloads, one
object per tensor), ours (warm worker, short polls, SQLite state, payloads in memory, weights
packed into one vector per message), ours-unpacked (ours with one object per tensor),
ours-sqlite-payloads (ours with payloads in SQLite too), ours-memory (ours with all SuperLink
state in memory). ``--model default`` uses the default network (85 tensors, 0.56 M parameters)
instead of the tiny one (41 tensors). Rows go to ``--out`` (CSV).
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

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.superlink import ManagedProcess, bin_path, flwr_env, free_port  # noqa: E402

SITES = {"udiat": "SynES1", "busi": "SynEG", "bus-uclm": "SynES2"}  # synthetic stand-ins
TINY_MODEL = {"base_channels": 4, "depth": 2}
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


def run_mode(mode: str, root: Path, pki: Path, rounds: int, images: int, timeout: float,
             app_dir: Path | None = None, model: str = "tiny") -> list[dict]:
    """One federation run in ``mode``; returns per-round timing rows."""
    root.mkdir(parents=True)
    port, settings = free_port(), MODES[mode]
    run_dir = root / "run"
    spec = {
        "experiment": {"data": {"image_size": 32, "val_fraction": 0.25, "augment": False},
                       "model": TINY_MODEL if model == "tiny" else {},
                       "train": {"batch_size": 8, "device": "cpu", "num_threads": 1, "progress": False}},
        "federation": {"strategy": "fedavg", "rounds": rounds, "local_epochs": 1, "min_sites": 3,
                       "quorum_timeout_s": 120, "round_timeout_s": 300, "central_eval": False,
                       "packed_weights": settings["packed"]},
        "sites": [{"name": n, "synthetic_centre": c, "synthetic_n": images} for n, c in SITES.items()],
        "run_dir": str(run_dir),
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(spec))
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
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", type=int, default=16, help="synthetic images per site")
    p.add_argument("--modes", default="stock,ours")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=900.0, help="per mode, seconds")
    p.add_argument("--app-dir", type=Path, default=None, help="Flower app to submit (default: this repo)")
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "deployment_overhead.csv")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: {sorted(MODES)}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedbus-overhead-"))
    pki = _pki(work / "pki")
    means: dict[str, float] = {}
    all_rows: list[dict] = []
    for mode in modes:
        t0 = time.perf_counter()
        timings = run_mode(mode, work / mode, pki, args.rounds, args.images, args.timeout, args.app_dir,
                           args.model)
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
