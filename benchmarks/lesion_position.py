"""Where the lesions sit, per centre, and a run's Dice by lesion position.

A model trained on one centre learns where that centre's lesions sit. BrEaST's lie in the upper
part of the frame and mid-width; the external centres put them deeper and further to the sides.
This prints the spread of lesion centres (fractions of the width and height, ground-truth masks
at the run's image size) for every centre found, then, for each run folder given, Dice and the
failure rate (Dice < 0.1) of its lesion images by how far the lesion centre lies from mid-width
and by depth:

    python -m benchmarks.lesion_position runs/T_cl45 --inference flip+shift
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.external_validation import (
    DEFAULT_CACHE, TRAIN_CENTRE, cache_dir_of, default_data_root, load_external,
)
from common.data import discover_centres, load_centre
from common.data.tensors import to_tensors

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


def _run_size(run: Path) -> int | None:
    """Image size of a run folder of ``benchmarks.external_validation`` (its config.yaml), or of
    an ensemble folder of ``benchmarks.ensemble`` (its first member's, from members.txt)."""
    cfg = run / "config.yaml"
    if not cfg.is_file() and (run / "members.txt").is_file():
        cfg = Path((run / "members.txt").read_text().split()[0]) / "config.yaml"
    return int(yaml.safe_load(cfg.read_text())["args"]["size"]) if cfg.is_file() else None


def _positions(centre: str, root: Path, size: int, cache: Path | None) -> pd.DataFrame:
    data = (to_tensors(load_centre(centre, root, strict=False), size) if centre == TRAIN_CENTRE
            else load_external(centre, root, size, cache))
    return lesion_centres(data.masks.cpu().numpy()).assign(case_id=list(data.case_ids))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="*", help="run folders (per_image.csv of one arm)")
    p.add_argument("--inference", default="raw", help="inference variant of the runs' rows")
    p.add_argument("--size", type=int, default=None, help="mask size (default: the first run's, or its first member's; else 128)")
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    logging.getLogger("common.data").setLevel(logging.ERROR)  # repairs are counted elsewhere
    size = args.size or (_run_size(args.runs[0]) if args.runs else None) or 128
    centres = discover_centres(args.data_root)
    if not centres:
        print(f"{args.data_root}: no centre found", file=sys.stderr)
        return 2
    cache = cache_dir_of(args.cache_dir)
    pos = {c: _positions(c, root, size, cache) for c, root in centres.items()}
    table = pd.DataFrame([{"centre": c, "n_lesion": int(p_["cx"].notna().sum()), **spread(p_)}
                          for c, p_ in pos.items()])
    print(f"lesion centres, fractions of width (cx) and height (cy), {size} px masks")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for run in args.runs:
        path = run / "per_image.csv"
        if not path.is_file():
            print(f"{path}: not found", file=sys.stderr)
            return 2
        pi = pd.read_csv(path)
        pi = pi[(pi["inference"] == args.inference) & pi["has_lesion"].astype(bool)]
        if pi.empty:
            print(f"{path}: no lesion rows with inference {args.inference!r}", file=sys.stderr)
            return 2
        for centre, g in pi.groupby("eval_centre"):
            if centre not in pos:
                continue
            out = by_position(g[["case_id", "dice"]], pos[centre])
            print(f"\n{run} ({args.inference}), {centre}: Dice by lesion position")
            print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
