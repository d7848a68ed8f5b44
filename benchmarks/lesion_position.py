"""Where the lesions sit, per centre, and a run's Dice by lesion position.

A model trained on one centre learns where that centre's lesions sit. BrEaST's lie in the upper
part of the frame and mid-width; the external centres put them deeper and further to the sides.
This prints the spread of lesion centres (fractions of the width and height, ground-truth masks
at the run's image size) for every centre found, then, for each simulation run folder given,
Dice and the failure rate (Dice < 0.1) of one arm's lesion images (seeds averaged per image) by
how far the lesion centre lies from mid-width and by depth. The masks are made with the data
settings of the first run's ``config.yaml`` (the images it scored), else of ``--preset`` (default
``paper``: 128 px), with any ``--set`` on top:

    python -m benchmarks.lesion_position runs/lco-20250101-120000 --arm consistency-ens
    python -m benchmarks.lesion_position --set data.image_size=160
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from benchmarks.pair_runs import arm_dice
from benchmarks.perfutil import add_settings_args
from common.config import ConfigError, DataConfig
from common.data import discover_centres
from common.federation import SiteSpec
from common.settings import load_settings
from common.sitedata import load_test_tensors

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = "paper"  # 128 px masks, the size used before a run gives its own

#: bands of |lesion centre column − mid-width| and of the lesion centre row, fractions of the side
LATERAL_BANDS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEPTH_BANDS = (0.0, 0.4, 1.0)
FAILED = 0.1


def lesion_centres(masks: np.ndarray) -> pd.DataFrame:
    """masks (N,1,H,W) or (N,H,W) → columns cx, cy: the mask's centre of mass as fractions of the
    width and height (pixel centres at (i + 0.5) / side); NaN for an image without lesion."""
    m = np.asarray(masks, dtype=float).reshape(len(masks), *np.shape(masks)[-2:]) > 0.5
    area = m.sum((1, 2)).astype(float)
    h, w = m.shape[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (m * (np.arange(w) + 0.5)[None, None, :]).sum((1, 2)) / area / w
        cy = (m * (np.arange(h) + 0.5)[None, :, None]).sum((1, 2)) / area / h
    return pd.DataFrame({"cx": np.where(area > 0, cx, np.nan), "cy": np.where(area > 0, cy, np.nan)})


def spread(pos: pd.DataFrame) -> dict[str, float]:
    """5th / 50th / 95th percentiles of cx and cy over the images with a lesion."""
    p = pos.dropna()
    return {f"{k}_p{q}": float(np.percentile(p[k], q)) if len(p) else float("nan")
            for k in ("cx", "cy") for q in (5, 50, 95)}


def by_position(dice: pd.DataFrame, pos: pd.DataFrame) -> pd.DataFrame:
    """``dice`` (columns case_id, dice; lesion images of one centre) joined to ``pos`` (case_id,
    cx, cy) → one row per band: kind (lateral | depth), band, n, Dice, failure rate."""
    d = dice.merge(pos, on="case_id", how="inner", validate="one_to_one")
    if len(d) != len(dice):
        raise ValueError(f"{len(dice) - len(d)} scored images have no ground-truth position")
    rows = []
    for kind, value, edges in (("lateral", (d["cx"] - 0.5).abs(), LATERAL_BANDS),
                               ("depth", d["cy"], DEPTH_BANDS)):
        band = pd.cut(value, edges, right=False, include_lowest=True)
        for b, g in d.groupby(band, observed=True):
            rows.append({"kind": kind, "band": f"{b.left:g}-{b.right:g}", "n": len(g),
                         "dice": g["dice"].mean(), "failed": (g["dice"] < FAILED).mean()})
    return pd.DataFrame(rows)


def default_data_root() -> Path:
    return Path(os.environ.get("FEDBUS_DATA_ROOT", REPO.parent / "shared" / "data"))


def run_data(run: Path | None, preset: str | None = None,
             overrides: Sequence[str] = ()) -> tuple[DataConfig, str | None]:
    """(data settings, tensor cache folder or None) of the masks: those of a simulation run
    folder's resolved ``config.yaml`` (the images it scored; its cache), unless ``preset`` is
    given; ``DEFAULT_PRESET`` without either; ``overrides`` (``--set`` items) on top."""
    saved = run / "config.yaml" if run is not None else None
    source = preset or (saved if saved is not None and saved.is_file() else DEFAULT_PRESET)
    data_cfg = load_settings(source, overrides).experiment.data
    cache = str(run / "cache") if run is not None and (run / "cache").is_dir() else None
    return data_cfg, cache


def _positions(centre: str, root: Path, data_cfg: DataConfig, cache: str | None) -> pd.DataFrame:
    site = SiteSpec(name=centre, data_path=str(root), data_format=centre, strict=False)
    data = load_test_tensors(site, data_cfg, cache)
    return lesion_centres(data.masks.cpu().numpy()).assign(case_id=list(data.case_ids))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="*", help="run folders of python -m sim.leave_center_out")
    p.add_argument("--protocol", default="paper", help="protocol of the rows (default paper)")
    p.add_argument("--arm", default=None, help="arm of the rows (default: the protocol's only arm)")
    add_settings_args(p, DEFAULT_PRESET, default_text=f"the first run's config.yaml, else {DEFAULT_PRESET}")
    p.add_argument("--data-root", type=Path, default=default_data_root())
    args = p.parse_args(argv)
    logging.getLogger("common.data").setLevel(logging.ERROR)  # repairs are counted elsewhere
    try:
        data_cfg, cache = run_data(args.runs[0] if args.runs else None, args.preset, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    centres = discover_centres(args.data_root)
    if not centres:
        print(f"{args.data_root}: no centre found", file=sys.stderr)
        return 2
    pos = {c: _positions(c, root, data_cfg, cache) for c, root in centres.items()}
    table = pd.DataFrame([{"centre": c, "n_lesion": int(p_["cx"].notna().sum()), **spread(p_)}
                          for c, p_ in pos.items()])
    print(f"lesion centres, fractions of width (cx) and height (cy), {data_cfg.image_size} px masks")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for run in args.runs:
        path = run / "per_image.csv"
        if not path.is_file():
            print(f"{path}: not found", file=sys.stderr)
            return 2
        try:
            dice = arm_dice(pd.read_csv(path), args.protocol, args.arm, str(path)).reset_index()
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        for (train_set, centre), g in dice.groupby(["train_set", "test_centre"], sort=False):
            if centre not in pos:
                continue
            out = by_position(g[["case_id", "dice"]], pos[centre])
            print(f"\n{run} ({args.arm or args.protocol}, trained on {train_set}), {centre}: "
                  "Dice by lesion position")
            print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
