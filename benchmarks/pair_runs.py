"""Pair two runs of ``benchmarks/external_validation.py`` image by image: Dice of each and the
paired Wilcoxon p-value per evaluation centre and inference variant.

Both arms in one process take twice the wall time of one; on a 2-core machine the arms can run
as two processes at once (``--arms plain --threads 1`` and ``--arms consistency --threads 1``,
same seed and options, hence the same initial weights and data order) and be paired afterwards:

    python -m benchmarks.pair_runs runs/Z1 runs/C1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from common import metrics

KEY = ["eval_centre", "inference", "case_id"]


def pair(a_dir: Path, b_dir: Path) -> pd.DataFrame:
    """One row per (eval_centre, inference) both runs scored: n lesion images, Dice of A and B
    (means over lesion images), B − A and the Wilcoxon p of B vs A. Raises when the runs scored
    different images in such a group, which would make the pairing meaningless."""
    runs = []
    for d in (a_dir, b_dir):
        path = d / "per_image.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a run folder of benchmarks/external_validation.py?)")
        pi = pd.read_csv(path)
        arms = pi["arm"].unique()
        if len(arms) != 1:
            raise ValueError(f"{path}: holds arms {list(arms)}; pair runs of one arm each")
        runs.append(pi[pi["has_lesion"] == 1].set_index(KEY)["dice"])
    groups = runs[0].index.droplevel(2).unique().intersection(runs[1].index.droplevel(2).unique())
    if groups.empty:
        raise ValueError(f"{a_dir} and {b_dir} share no (centre, inference) group")
    a, b = (r[r.index.droplevel(2).isin(groups)] for r in runs)
    common = a.index.intersection(b.index)
    if len(common) != len(a) or len(common) != len(b):
        raise ValueError(f"{a_dir} and {b_dir} scored different images ({len(a)} vs {len(b)}, "
                         f"{len(common)} shared)")
    rows = []
    both = pd.concat({"a": a, "b": b}, axis=1)  # aligned on (centre, inference, case_id)
    for (centre, inference), g in both.groupby(level=[0, 1]):
        x, y = g["a"].to_numpy(), g["b"].to_numpy()
        rows.append({"centre": centre, "inference": inference, "n_lesion": len(x),
                     "dice_a": x.mean(), "dice_b": y.mean(), "b_minus_a": y.mean() - x.mean(),
                     "p_wilcoxon": metrics.paired_wilcoxon(y, x)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path, help="reference run folder (e.g. the plain arm)")
    p.add_argument("run_b", type=Path, help="compared run folder (e.g. the consistency arm)")
    args = p.parse_args(argv)
    try:
        table = pair(args.run_a, args.run_b)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"A = {args.run_a}, B = {args.run_b}; Dice over lesion images")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
