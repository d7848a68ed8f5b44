"""``python -m sim.leave_center_out``: the published external validation (train on one centre,
test on the others), its federated leave-one-centre-out variants on Flower's simulation engine,
and the local-only / pooled reference rows, as one reproducible run folder with report.md.

Settings come through ``common.settings`` only: a preset (``--preset``; default ``cpu-fast`` on
the embedded synthetic centres, ``recommended`` with ``--data-root``) or a settings file, then
``--set section.key=value`` overrides, then the few shortcuts below. The resolved settings are
written to the run folder's config.yaml, which ``--preset`` accepts again; ``--resume RUN_DIR``
continues a stopped run with its own config.yaml and skips every unit already in results.csv.

SIGTERM or Ctrl-C stops the run (sim/stopping.py): the children and their Ray clusters are ended,
the finished units stay in the run folder, and the exit status is 128 + the signal (143, 130);
``--resume`` re-runs the unfinished units (a federated one from its last server checkpoint).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from common.checkpoint import provenance  # noqa: E402
from common.config import ConfigError, ExperimentConfig  # noqa: E402
from common.data import CENTRES, discover_centres  # noqa: E402
from common.device import check_device, set_threads  # noqa: E402
from common.federation import SiteSpec  # noqa: E402
from common.records import DataError  # noqa: E402
from common.settings import (  # noqa: E402
    DEFAULT_REAL_PRESET, DEFAULT_SYNTHETIC_PRESET, Settings, SimConfig, list_presets, load_settings,
    merge, parse_overrides, settings_from_dict, settings_to_dict,
)
from common.sitedata import load_test_tensors, require_cases, user_tensor_cache  # noqa: E402
from sim.federated import federated_spec  # noqa: E402
from sim.protocols import PlannedUnit, Runtime, plan_units  # noqa: E402
from sim.ensemble import score_ensembles  # noqa: E402
from sim.outputs import write_outputs  # noqa: E402
from sim.runfolder import SimRunFolder  # noqa: E402
from sim.stopping import StopSignals, Stopped  # noqa: E402
from sim.units import run_unit, unit_config  # noqa: E402
from sim.workers import run_units  # noqa: E402

log = logging.getLogger("sim.leave_center_out")


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.leave_center_out",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Every other setting: --set section.key=value (sections data, model, loss, train, "
               "privacy, inference, federation, sim); --list-presets shows the presets.",
    )
    p.add_argument("--preset", default=None, metavar="NAME|FILE",
                   help=f"a preset name or a settings YAML (a run folder's config.yaml works too); default "
                        f"{DEFAULT_SYNTHETIC_PRESET} (synthetic) or {DEFAULT_REAL_PRESET} (with --data-root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=3 --set sim.seeds=8,9 (repeatable)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding any of BrEaST/, UDIAT/, BUSI/, BUS-UCLM/ (sim.data_root); "
                        "default: the embedded synthetic centres")
    p.add_argument("--protocols", default=None,
                   help="shortcut for --set sim.protocols=...: paper, federated, reference (comma list)")
    p.add_argument("--seeds", default=None, help="shortcut for --set sim.seeds=...: comma list of training seeds")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (train.num_threads)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="root of the run folders (runs/lco-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a stopped run with its config.yaml; units already in results.csv are skipped")
    p.add_argument("--list-presets", action="store_true", help="list the presets, one line each, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (Flower's too)")
    return p


# ----------------------------------------------------------------------------- settings
def resolve_settings(args: argparse.Namespace) -> Settings:
    """Preset < --set < shortcuts, parsed once into frozen dataclasses."""
    over = parse_overrides(args.overrides)
    shortcuts: dict[str, Any] = {
        "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
        "protocols": args.protocols, "seeds": args.seeds,
    }
    sim = {k: (v.split(",") if isinstance(v, str) and k != "data_root" else v)
           for k, v in shortcuts.items() if v is not None}
    train = {"num_threads": args.threads} if args.threads is not None else {}
    over = merge(over, {"sim": sim, "train": train})
    real = args.data_root is not None or (over.get("sim") or {}).get("data_root")
    default = DEFAULT_REAL_PRESET if real else DEFAULT_SYNTHETIC_PRESET
    return load_settings(args.preset, over, default=default)


# ----------------------------------------------------------------------------- data
def site_specs(opts: SimConfig) -> dict[str, SiteSpec]:
    """The centres of this run, by name: real folders under data_root, else synthetic ones."""
    if opts.data_root:
        found = discover_centres(opts.data_root)
        if not found:
            raise ConfigError(f"{opts.data_root}: no centre folder (BrEaST, UDIAT, BUSI, BUS-UCLM) found")
        sites = {name: SiteSpec(name=name, data_path=str(found[name]), data_format=name, strict=False)
                 for name in CENTRES if name in found}  # the published order: BrEaST first
    else:
        from common.data.synthetic import SYNTHETIC_CENTRES

        sites = {name: SiteSpec(name=name, synthetic_centre=name, synthetic_n=opts.synthetic_n)
                 for name in SYNTHETIC_CENTRES}
    if opts.centres:
        missing = [c for c in opts.centres if c not in sites]
        if missing:
            raise ConfigError(f"sim.centres: {missing} not found; available: {list(sites)}")
        sites = {c: sites[c] for c in opts.centres}
    missing = [c for c in opts.label_only_centres if c not in sites]
    if missing:
        raise ConfigError(f"sim.label_only_centres: {missing} not among the centres {list(sites)}")
    return {name: dataclasses.replace(s, masks=name not in opts.label_only_centres) for name, s in sites.items()}


def default_train_centre(opts: SimConfig, centres: Sequence[str]) -> str:
    if opts.train_centre:
        return opts.train_centre
    return "BrEaST" if opts.data_root and "BrEaST" in centres else centres[0]


def describe_centres(sites: Mapping[str, SiteSpec], cfg: ExperimentConfig, cache_dir: str | None) -> pd.DataFrame:
    """Counts and a content fingerprint of the model-ready tensors per centre (report, provenance)."""
    rows = []
    for name, site in sites.items():
        data = load_test_tensors(site, cfg.data, cache_dir)
        rows.append({
            "centre": name,
            "images": len(data),
            "lesion images": int(data.has_lesion.sum()),
            "malignant": int(data.malignant.sum()),
            "fingerprint": data.fingerprint(),
        })
    return pd.DataFrame(rows)


def restart_unstarted_federations(todo: Sequence[PlannedUnit], settings: Settings, rt: Runtime) -> list[Path]:
    """Remove the scratch folders of unfinished federated units that have no server checkpoint
    (stopped in their first round): rerun from nothing rather than appended to. A unit with a
    checkpoint resumes from it (sim/federated.py). Returns the folders removed."""
    removed = []
    for pu in todo:
        if not pu.federated:
            continue
        run_dir = Path(federated_spec(pu, unit_config(pu, settings), settings, rt).run_dir)
        if run_dir.is_dir() and not (run_dir / "checkpoint.pt").is_file():
            shutil.rmtree(run_dir)
            removed.append(run_dir)
    return removed


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace, stop: StopSignals | None = None) -> int:
    """The whole run; ``stop`` (main(): SIGTERM/SIGINT handlers) is consulted so a signal never
    interrupts the writing of a unit's rows."""
    stop = stop or StopSignals()  # not entered: no handlers, held() is then a plain block
    started = time.perf_counter()
    if args.resume:
        folder: SimRunFolder | None = SimRunFolder.open(args.resume)
        settings = settings_from_dict(folder.read_config(), str(folder.path / "config.yaml"))
    else:
        folder = None
        settings = resolve_settings(args)
    cfg, opts = settings.experiment, settings.sim
    check_device(cfg.train.device)
    sites = site_specs(opts)  # every setting is checked before anything is written
    centres = list(sites)
    plan = plan_units(settings, centres, default_train_centre(opts, centres))
    cache_dir = str(user_tensor_cache()) if opts.data_root else None  # keyed by the data fingerprint
    require_cases(sites, cfg.data, cache_dir)  # an empty or all-invalid centre: refused, nothing written
    with stop.held():
        if folder is None:
            folder = SimRunFolder.create(args.out)
            folder.write_config(settings_to_dict(settings))
        else:
            folder.drop_incomplete()
    try:
        return _run_in(folder, args, settings, sites, plan, cache_dir, stop, started)
    except Stopped as exc:
        return _stopped(folder, exc, plan)


def _run_in(folder: SimRunFolder, args: argparse.Namespace, settings: Settings, sites: Mapping[str, SiteSpec],
            plan: Sequence[PlannedUnit], cache_dir: str | None, stop: StopSignals, started: float) -> int:
    """The units, ensembles and report of ``plan`` in ``folder`` (created, or opened to resume)."""
    cfg, opts, centres = settings.experiment, settings.sim, list(sites)
    set_threads(args.threads or cfg.train.num_threads)  # resume: this process only, results unchanged
    print(f"run folder: {folder.path}  ({len(plan)} units over centres {', '.join(centres)})", flush=True)
    table = describe_centres(sites, cfg, cache_dir)
    fingerprints = dict(zip(table["centre"], table["fingerprint"]))
    prov = folder.write_provenance()
    if prov.get("data_fingerprints") and prov["data_fingerprints"] != fingerprints:
        raise ConfigError(f"{folder.path}: the data differ from the first start "
                          f"({prov['data_fingerprints']} vs {fingerprints}); start a new run")
    now = provenance()
    folder.write_provenance(
        seeds=list(opts.seeds), data_fingerprints=fingerprints, data_root=opts.data_root or "synthetic",
        events=[{"event": "resume" if args.resume else "start", "time": now["time_utc"],
                 "git_commit": now["git_commit"], "argv": sys.argv}],
    )
    done = folder.completed_units()
    todo = [pu for pu in plan if pu.unit.key not in done]
    if done:
        print(f"resuming: {len(plan) - len(todo)} of {len(plan)} units already complete", flush=True)
    rt = Runtime(sites=sites, cache_dir=cache_dir, scratch=folder.path / "federated",
                 device=cfg.train.device, progress=not args.no_progress)
    for gone in restart_unstarted_federations(todo, settings, rt):
        log.info("%s: stopped before its first checkpoint; it starts again", gone)
    failed: list[str] = []
    bar = tqdm(total=len(todo), desc="units", unit="unit", disable=True if args.no_progress else None)
    units = run_units(todo, settings, rt, folder.path, run=run_unit)
    try:
        for pu, out in units:
            with stop.held():  # a unit's rows are written whole (or not at all, and re-run)
                bar.update()
                bar.set_postfix_str(pu.unit.key)
                if isinstance(out, BaseException):
                    log.error("unit %s failed:\n%s", pu.unit.key, "".join(traceback.format_exception(out)))
                    failed.append(pu.unit.key)
                    continue
                if out.examples:
                    atomic_write(folder.examples_dir / f"{pu.unit.key}.npz",
                                 lambda fh, ex=out.examples: np.savez_compressed(fh, **ex), binary=True, mode=None)
                folder.write_unit(pu.unit, out.results, out.per_image, out.curves)
                folder.write_provenance(units=[{"unit": pu.unit.key, "seconds": round(out.seconds, 1),
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}])
    finally:
        units.close()  # ends every child process group (at once when stopped)
        bar.close()
    try:
        for unit, out in score_ensembles(plan, folder, settings, rt):
            folder.write_unit(unit, out.results, out.per_image, out.curves)
            folder.write_provenance(units=[{"unit": unit.key, "seconds": round(out.seconds, 1),
                                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}])
    except Exception:  # noqa: BLE001 - the members' results stay; the ensemble can be rerun with --resume
        log.error("ensemble scoring failed:\n%s", traceback.format_exc())
        failed.append("ensembles")
    report = write_outputs(folder, settings, table, plan)
    wall = time.perf_counter() - started
    folder.write_provenance(events=[{"event": "end", "wall_seconds": round(wall, 1), "failed": failed}])
    print(f"report: {report}  ({wall:.0f} s)", flush=True)
    if failed:
        print(f"{len(failed)} unit(s) failed: {', '.join(failed)}; fix and --resume {folder.path}", file=sys.stderr)
        return 1
    return 0


def _stopped(folder: SimRunFolder, exc: Stopped, plan: Sequence[PlannedUnit]) -> int:
    """Record the stop in provenance.json, say how to resume; returns the exit status."""
    done = len(folder.completed_units() & {pu.unit.key for pu in plan})
    folder.write_provenance(events=[{"event": "stopped", "signal": exc.name, "units_done": done,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
    print(f"stopped by {exc.name} after {done} of {len(plan)} units; the run folder is resumable:\n"
          f"  python -m sim.leave_center_out --resume {folder.path}", file=sys.stderr, flush=True)
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, text in list_presets().items():
            print(f"{name:12s} {text}")
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; once is enough
    if not args.verbose:  # the server app raises its own loggers to INFO for its log file
        logging.getLogger("flwr").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    try:
        with StopSignals() as stop:
            return run(args, stop)
    except Stopped as exc:  # before the run folder existed: nothing to resume
        print(f"{exc}; no run folder was written", file=sys.stderr)
        return exc.exit_code
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # a centre's folder has malformed files (strict loading)
        print(f"error: {exc}\n(check the site with fedbus-site-check; --centres leaves a centre out)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
