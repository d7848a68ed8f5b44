"""Score a model file on whole public centres with the simulation's own scoring.

    python -m sim.score_model MODEL.pt --data-root DATA --centres BUSI BUS-UCLM [--out scores.csv]

The same prediction (the file's inference settings and temperature), metrics and bootstrap CIs
as a ``sim.leave_center_out`` unit, so a model trained elsewhere — a public → private run's
public model (``<run>/public/*.pt``), a model received from a federation — is compared with the
simulation's rows like for like. Every image of each centre is scored (nothing of it may have
been trained on), or with ``--own-split F`` each centre's own held-back test split at fraction F
(the split ``sim.test_on: own_split`` tests on, from the file's data settings). Prints one line
per centre; ``--out`` writes the tidy rows (csv).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

import pandas as pd

from common.atomic import atomic_write
from common.data import discover_centres
from common.device import resolve_device, set_threads
from common.evaluate import score
from common.federation import SiteSpec
from common.inference import build_predictor
from common.inference import predict as predict_with
from common.loaded_model import load_model
from common.modelfile import ModelFileError
from common.sitedata import load_own_test_tensors, load_test_tensors
from sim.protocols import metric_rows

log = logging.getLogger(__name__)


def centre_sites(data_root: str, centres: Sequence[str]) -> dict[str, SiteSpec]:
    """The named public centres under ``data_root`` as sites (their published layouts, lenient
    like the simulation); ValueError naming the centres that are not there."""
    found = discover_centres(data_root)
    missing = [c for c in centres if c not in found]
    if missing:
        raise ValueError(f"{data_root}: centre(s) {missing} not found; available: {sorted(found)}")
    return {c: SiteSpec(name=c, data_path=str(found[c]), data_format=c, strict=False) for c in centres}


def score_model(path: str, data_root: str, centres: Sequence[str], bootstrap: int = 1000,
                device: str = "auto", own_split: float | None = None) -> pd.DataFrame:
    """Tidy rows (model, test_centre, metric, value, ci_low, ci_high, n) of ``path`` on ``centres``:
    every image, or each centre's own test split at fraction ``own_split``."""
    loaded = load_model(path)
    sites = centre_sites(data_root, centres)
    member = loaded.members[0]
    data_cfg = member.config.data
    if own_split is not None:
        data_cfg = dataclasses.replace(data_cfg, test_fraction=own_split)
    dev = resolve_device(device)
    predictor = build_predictor([m.network() for m in loaded.members], loaded.inference,
                                temperatures=loaded.temperatures).to(dev)
    t = loaded.inference.threshold
    rows = []
    for centre, site in sites.items():
        data = (load_own_test_tensors if own_split is not None else load_test_tensors)(site, data_cfg)
        probs, p_mal = predict_with(predictor, data, loaded.inference, 16, dev)
        result = score(probs, p_mal, data, threshold=t, mask_threshold=t)
        classify = member.config.loss.cls_weight > 0
        for r in metric_rows(result.per_image, result.summary, centre, classify, bootstrap, 0, t):
            rows.append({"model": loaded.name, **r})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file (.pt) or ensemble manifest (.yaml)")
    p.add_argument("--data-root", required=True, help="folder of the public centres")
    p.add_argument("--centres", nargs="+", required=True, help="centres to score on, e.g. BUSI BUS-UCLM")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each CI")
    p.add_argument("--own-split", type=float, default=None, metavar="F",
                   help="score each centre's own held-back test split at fraction F (sim.test_on own_split)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="write the rows to this csv")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        set_threads(args.threads)
    try:
        rows = score_model(args.model, args.data_root, args.centres, args.bootstrap, own_split=args.own_split)
    except (ModelFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for centre, g in rows.groupby("test_centre", sort=False):
        cells = {r.metric: f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in g.itertuples()}
        print(f"{centre}: Dice {cells.get('dice', '–')}  AUC {cells.get('auc', '–')}")
    if args.out:
        atomic_write(args.out, lambda fh: rows.to_csv(fh, index=False), mode=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
