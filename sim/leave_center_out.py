"""``python -m sim.leave_center_out``: the published external validation (train on one centre,
test on the others), its federated leave-one-centre-out variants on Flower's simulation engine,
and the local-only / pooled reference rows, as one reproducible run folder with report.md.

Without arguments it runs on the embedded synthetic centres with small settings (minutes on two
CPU cores); ``--data-root`` runs on every real centre found there. Settings resolve as: built-in
defaults (synthetic or real) < ``--config`` YAML < command-line flags, and are written to the run
folder's config.yaml, which ``--config`` accepts again. ``--resume RUN_DIR`` continues a stopped
run with its own config.yaml and skips every unit already in its results.csv. ``--epsilons
1,3,8,inf`` adds DP-SGD variants of the ``--dp-arms`` (``<arm>-eps<ε>``) to every protocol and an
ε-utility table to the report.
"""
from __future__ import annotations

import argparse
import logging
import os
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

from common.checkpoint import provenance  # noqa: E402
from common.config import ConfigError, ExperimentConfig, from_dict, load_yaml, to_dict  # noqa: E402
from common.data import CENTRES, discover_centres  # noqa: E402
from common.device import set_threads  # noqa: E402
from common.federation import LR_SCHEDULES, SiteSpec  # noqa: E402
from common.records import DataError  # noqa: E402
from common.sitedata import load_test_tensors  # noqa: E402
from sim.protocols import LcoOptions, Runtime, plan_units  # noqa: E402
from sim.outputs import write_outputs  # noqa: E402
from sim.runfolder import RunFolder  # noqa: E402
from sim.units import run_unit  # noqa: E402

log = logging.getLogger("sim.leave_center_out")

#: Built-in settings under the YAML and the flags. Synthetic: a few minutes on 2 CPU cores.
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "data": {"image_size": 64},
    "model": {"base_channels": 16, "depth": 3},
    "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3},
    "lco": {"rounds": 4, "local_epochs": 2, "synthetic_n": 48},  # rounds × local epochs = epochs
}
REAL_DEFAULTS: dict[str, Any] = {
    "data": {"image_size": 128},
    "train": {"epochs": 30},
    "lco": {"rounds": 15, "local_epochs": 2},
}
#: --quick: a smoke test of every code path, not a result.
QUICK: dict[str, Any] = {
    "data": {"image_size": 32},
    "model": {"base_channels": 8, "depth": 3},
    "train": {"epochs": 1, "batch_size": 16},
    "lco": {"rounds": 1, "local_epochs": 1, "synthetic_n": 24, "bootstrap": 200},  # 24: no split empty
}
EXPERIMENT_KEYS = ("data", "model", "loss", "train", "privacy")


# ----------------------------------------------------------------------------- arguments
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _csv(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _csv(text)]


# argparse names the type in its error ("invalid comma-separated numbers value: 'a'")
_floats.__name__, _ints.__name__ = "comma-separated numbers", "comma-separated integers"


def _defaults(section: str, key: str) -> str:
    return f"{SYNTHETIC_DEFAULTS[section][key]} synthetic, {REAL_DEFAULTS[section][key]} real"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.leave_center_out",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Unset flags fall back to --config, then to the built-in synthetic or real-data defaults.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data-root", type=Path, default=None,
                   help="folder holding any of BrEaST/, UDIAT/, BUSI/, BUS-UCLM/; every centre found is used "
                        "(default: the embedded synthetic centres)")
    d.add_argument("--centres", type=_csv, default=None,
                   help="use only these of the centres found (comma list; default: all)")
    d.add_argument("--train-center", default=None,
                   help="training centre of the paper protocol (default: BrEaST, or the first synthetic centre)")
    d.add_argument("--size", type=int, default=None, help=f"image side in pixels (data.image_size; default {_defaults('data', 'image_size')})")
    w = p.add_argument_group("protocols")
    w.add_argument("--protocols", type=_csv, default=None,
                   help="comma list of paper (train on one centre, test on the others), federated "
                        "(FedAvg + FedProx leave-one-centre-out), reference (local-only matrix + pooled)")
    w.add_argument("--arms", type=_csv, default=None,
                   help="paper-protocol arms: seg_only (no classification), multitask (λ=0), consistency (λ)")
    w.add_argument("--fed-arms", type=_csv, default=None,
                   help="arms of the federated and reference protocols (consistency[,multitask])")
    w.add_argument("--strategies", type=_csv, default=None, help="federated strategies (fedavg,fedprox)")
    w.add_argument("--held-out", type=_csv, default=None,
                   help="federated/pooled: hold out only these centres (default: each centre in turn)")
    w.add_argument("--lambda-sweep", type=_floats, default=None,
                   help="extra paper arms with these consistency weights λ, e.g. 0.1,1,2")
    w.add_argument("--ablate-features", action="store_true", default=None,
                   help="extra paper arms leaving each BI-RADS feature out of the prior in turn")
    w.add_argument("--epsilons", type=_floats, default=None,
                   help="DP-SGD targets, e.g. 1,3,8,inf: each arm of --dp-arms gets an extra arm "
                        "<arm>-eps<ε> per finite ε (sample-level, δ = privacy.target_delta); inf is the arm "
                        "without DP. The report adds an ε-utility table")
    w.add_argument("--dp-arms", type=_csv, default=None,
                   help="arms that get the DP variants, in every protocol that runs them (default: consistency)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None, help=f"centralised epochs (train.epochs; default {_defaults('train', 'epochs')})")
    t.add_argument("--rounds", type=int, default=None, help=f"federated rounds (default {_defaults('lco', 'rounds')})")
    t.add_argument("--local-epochs", type=int, default=None, help=f"local epochs per federated round (default {_defaults('lco', 'local_epochs')})")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="federated lr schedule: restart train.schedule every round (round; default) "
                        "or lay one over rounds × local epochs, as centralised training (global)")
    t.add_argument("--seeds", type=_ints, default=None,
                   help="comma list of training seeds (model init, data order); splits stay fixed")
    t.add_argument("--selection", choices=["best_val", "last"], default=None,
                   help="centralised arms keep the epoch with the best validation score (mean of val "
                        "Dice and AUC; default) or the last epoch; federated arms keep the last round")
    t.add_argument("--depth-tta", type=_floats, default=None, metavar="SHIFTS",
                   help="score the test centres with depth-shift test-time augmentation: the image, its "
                        "mirror and the image shifted up by these fractions of its height, e.g. 0.15,0.3 "
                        "(common/tta.py; model selection stays on the raw model); default none")
    t.add_argument("--batch-size", type=int, default=None, help="train.batch_size (the expected batch under DP)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (train.num_threads; simulated sites use 1 each)")
    r = p.add_argument_group("run")
    r.add_argument("--config", type=Path, default=None,
                   help="experiment YAML: sections data/model/loss/train/privacy (ExperimentConfig) and lco "
                        "(protocol options); a run folder's config.yaml works too")
    r.add_argument("--out", type=Path, default=Path("runs"), help="root of the run folders (runs/lco-YYYYmmdd-HHMMSS)")
    r.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a stopped run with its config.yaml; units already in results.csv are skipped")
    r.add_argument("--quick", action="store_true", help="tiny smoke settings (32 px, 1 epoch, 1 round)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (Flower's too)")
    return p


# ----------------------------------------------------------------------------- settings
def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def parse_settings(raw: Mapping[str, Any], where: str) -> tuple[ExperimentConfig, LcoOptions]:
    """Split a mapping into the ExperimentConfig and the ``lco`` options (unknown keys are errors)."""
    unknown = sorted(set(raw) - set(EXPERIMENT_KEYS) - {"lco"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {[*EXPERIMENT_KEYS, 'lco']}")
    cfg = from_dict(ExperimentConfig, {k: raw[k] for k in EXPERIMENT_KEYS if k in raw}, where)
    opts = from_dict(LcoOptions, raw.get("lco"), f"{where}: lco")
    return cfg, opts


def resolve_settings(args: argparse.Namespace) -> tuple[ExperimentConfig, LcoOptions]:
    """Defaults < YAML < flags, parsed once into frozen dataclasses."""
    yaml_raw = load_yaml(args.config) if args.config else {}
    data_root = args.data_root if args.data_root is not None else (yaml_raw.get("lco") or {}).get("data_root")
    raw = _merge(REAL_DEFAULTS if data_root else SYNTHETIC_DEFAULTS, yaml_raw)
    if args.quick:
        raw = _merge(raw, QUICK)
    flags: dict[str, Any] = {
        "data": {"image_size": args.size},
        "train": {"epochs": args.epochs, "num_threads": args.threads, "batch_size": args.batch_size},
        "lco": {
            "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
            "centres": args.centres, "held_out": args.held_out,
            "train_centre": args.train_center, "protocols": args.protocols, "arms": args.arms,
            "fed_arms": args.fed_arms, "strategies": args.strategies, "rounds": args.rounds,
            "local_epochs": args.local_epochs, "seeds": args.seeds, "lambda_sweep": args.lambda_sweep,
            "ablate_features": args.ablate_features, "epsilons": args.epsilons, "dp_arms": args.dp_arms,
            "selection": args.selection, "lr_schedule": args.lr_schedule, "depth_tta": args.depth_tta,
        },
    }
    flags = {s: {k: v for k, v in sec.items() if v is not None} for s, sec in flags.items()}
    return parse_settings(_merge(raw, flags), str(args.config or "settings"))


def resolved_dict(cfg: ExperimentConfig, opts: LcoOptions) -> dict[str, Any]:
    return {**to_dict(cfg), "lco": to_dict(opts)}


# ----------------------------------------------------------------------------- data
def site_specs(opts: LcoOptions) -> dict[str, SiteSpec]:
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
            raise ConfigError(f"lco.centres: {missing} not found; available: {list(sites)}")
        sites = {c: sites[c] for c in opts.centres}
    return sites


def default_train_centre(opts: LcoOptions, centres: Sequence[str]) -> str:
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


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.resume:
        folder: RunFolder | None = RunFolder.open(args.resume)
        cfg, opts = parse_settings(folder.read_config(), str(folder.path / "config.yaml"))
    else:
        folder = None
        cfg, opts = resolve_settings(args)
    sites = site_specs(opts)  # every setting is checked before anything is written
    centres = list(sites)
    plan = plan_units(opts, cfg, centres, default_train_centre(opts, centres))
    if folder is None:
        folder = RunFolder.create(args.out)
        folder.write_config(resolved_dict(cfg, opts))
    else:
        folder.drop_incomplete()
    set_threads(args.threads or cfg.train.num_threads)  # resume: this process only, results unchanged
    cache_dir = str(folder.path / "cache") if opts.data_root else None  # decoded real images
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
    failed: list[str] = []
    bar = tqdm(todo, desc="units", unit="unit", disable=True if args.no_progress else None)
    for pu in bar:
        bar.set_postfix_str(pu.unit.key)
        try:
            out = run_unit(pu, cfg, opts, rt)
        except Exception:  # noqa: BLE001 - one failed unit must not lose the others
            log.error("unit %s failed:\n%s", pu.unit.key, traceback.format_exc())
            failed.append(pu.unit.key)
            continue
        if out.examples:
            np.savez_compressed(folder.examples_dir / f"{pu.unit.key}.npz", **out.examples)
        folder.write_unit(pu.unit, out.results, out.per_image, out.curves)
        folder.write_provenance(units=[{"unit": pu.unit.key, "seconds": round(out.seconds, 1),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}])
    report = write_outputs(folder, cfg, opts, table, plan)
    wall = time.perf_counter() - started
    folder.write_provenance(events=[{"event": "end", "wall_seconds": round(wall, 1), "failed": failed}])
    print(f"report: {report}  ({wall:.0f} s)", flush=True)
    if failed:
        print(f"{len(failed)} unit(s) failed: {', '.join(failed)}; fix and --resume {folder.path}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the server app raises its own loggers to INFO for its log file
        logging.getLogger("flwr").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # a centre's folder has malformed files (strict loading)
        print(f"error: {exc}\n(check the site with fedbus-site-check; --centres leaves a centre out)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
