"""Pair two simulation run folders (or two arms of one) image by image: per training set and
test centre, the Dice of each and the paired Wilcoxon p-value.

A run's report compares its own arms; this compares across runs (two presets, two recipes),
from their ``per_image.csv``. Per-image Dice is first averaged over the seeds of an arm, as the
report does; an ensemble unit (arm ``<arm>-ens``) is an arm of its own:

    python -m benchmarks.pair_runs runs/lco-A runs/lco-B --arm-a consistency --arm-b consistency-ens
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from common import metrics

KEY = ["train_set", "test_centre", "case_id"]


def arm_dice(per_image: pd.DataFrame, protocol: str, arm: str | None, where: str) -> pd.Series:
    """Dice of the lesion images of one (protocol, arm) of a run's per_image table, indexed by
    KEY and averaged over seeds. ``arm`` None: the protocol's only arm (ValueError otherwise)."""
    rows = per_image[per_image["protocol"] == protocol]
    arms = list(dict.fromkeys(rows["arm"]))
    if arm is None:
        if len(arms) != 1:
            raise ValueError(f"{where}: protocol {protocol!r} holds arms {arms}; choose one")
        arm = arms[0]
    rows = rows[(rows["arm"] == arm) & rows["has_lesion"].astype(bool)]
    if rows.empty:
        raise ValueError(f"{where}: no lesion rows of protocol {protocol!r}, arm {arm!r} (arms: {arms})")
    return rows.groupby(KEY)["dice"].mean()


def pair_frames(a: pd.Series, b: pd.Series, names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """Pair two Dice series indexed by KEY, never by row order. One row per (train_set,
    test_centre) both scored: n lesion images, mean Dice of A and B, B − A and the Wilcoxon p of
    B vs A. Raises when they scored different images in such a group, which would make the
    pairing meaningless; ``names`` label the two in that message."""
    groups = a.index.droplevel(2).unique().intersection(b.index.droplevel(2).unique())
    if groups.empty:
        raise ValueError(f"{names[0]} and {names[1]} share no (train set, test centre)")
    a, b = (r[r.index.droplevel(2).isin(groups)] for r in (a, b))
    common = a.index.intersection(b.index)
    if len(common) != len(a) or len(common) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} scored different images ({len(a)} vs {len(b)}, "
                         f"{len(common)} shared)")
    rows = []
    both = pd.concat({"a": a, "b": b}, axis=1)  # aligned on KEY
    for (train_set, centre), g in both.groupby(level=[0, 1], sort=False):
        x, y = g["a"].to_numpy(float), g["b"].to_numpy(float)
        rows.append({"train_set": train_set, "test_centre": centre, "n_lesion": len(x),
                     "dice_a": x.mean(), "dice_b": y.mean(), "b_minus_a": y.mean() - x.mean(),
                     "p_wilcoxon": metrics.paired_wilcoxon(y, x)})
    return pd.DataFrame(rows)


def pair(a_dir: Path, b_dir: Path, arm_a: str | None = None, arm_b: str | None = None,
         protocol: str = "paper") -> pd.DataFrame:
    """``pair_frames`` of arm ``arm_a`` of run ``a_dir`` and ``arm_b`` of ``b_dir`` (either run
    folder may be the same one)."""
    sides = []
    for d, arm in ((a_dir, arm_a), (b_dir, arm_b)):
        path = Path(d) / "per_image.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a run folder of python -m sim.leave_center_out?)")
        sides.append(arm_dice(pd.read_csv(path), protocol, arm, str(path)))
    return pair_frames(sides[0], sides[1], (f"{a_dir} ({arm_a or protocol})", f"{b_dir} ({arm_b or protocol})"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path, help="reference run folder")
    p.add_argument("run_b", type=Path, help="compared run folder (may be run_a, with another arm)")
    p.add_argument("--protocol", default="paper", help="protocol of the rows paired (default paper)")
    p.add_argument("--arm-a", help="arm of A (default: its only arm in the protocol)")
    p.add_argument("--arm-b", help="arm of B (default: its only arm in the protocol)")
    args = p.parse_args(argv)
    try:
        table = pair(args.run_a, args.run_b, args.arm_a, args.arm_b, args.protocol)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"A = {args.run_a} {args.arm_a or ''}, B = {args.run_b} {args.arm_b or ''}; "
          "Dice over lesion images, seeds averaged per image")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
