"""Pair two runs of ``benchmarks/external_validation.py`` image by image: Dice of each and the
paired Wilcoxon p-value per evaluation centre and inference variant.

Both arms in one process take twice the wall time of one; on a 2-core machine the arms can run
as two processes at once (``--arms plain --threads 1`` and ``--arms consistency --threads 1``,
same seed and options, hence the same initial weights and data order) and be paired afterwards:

    python -m benchmarks.pair_runs runs/Z1 runs/C1

Two inference variants of one run (or of two) pair the same way:

    python -m benchmarks.pair_runs runs/MS1 runs/MS1 --inference-a raw --inference-b flip+shift
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from common import metrics

KEY = ["eval_centre", "inference", "case_id"]


def pair_frames(a_pi: pd.DataFrame, b_pi: pd.DataFrame, names: tuple[str, str] = ("A", "B")) -> pd.DataFrame:
    """Pair two per-image frames (columns eval_centre, inference, case_id, has_lesion, dice) by
    (eval_centre, inference, case_id), never by row order. One row per (eval_centre, inference)
    both scored: n lesion images, Dice of A and B (means over lesion images), B − A and the
    Wilcoxon p of B vs A. Raises when they scored different images in such a group, which would
    make the pairing meaningless; ``names`` label the two in that message."""
    a, b = (pi[pi["has_lesion"].astype(bool)].set_index(KEY)["dice"] for pi in (a_pi, b_pi))
    for name, r in zip(names, (a, b)):
        if r.index.has_duplicates:
            raise ValueError(f"{name}: an image is scored twice in one (centre, inference) group")
    groups = a.index.droplevel(2).unique().intersection(b.index.droplevel(2).unique())
    if groups.empty:
        raise ValueError(f"{names[0]} and {names[1]} share no (centre, inference) group")
    a, b = (r[r.index.droplevel(2).isin(groups)] for r in (a, b))
    common = a.index.intersection(b.index)
    if len(common) != len(a) or len(common) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} scored different images ({len(a)} vs {len(b)}, "
                         f"{len(common)} shared)")
    rows = []
    both = pd.concat({"a": a, "b": b}, axis=1)  # aligned on (centre, inference, case_id)
    for (centre, inference), g in both.groupby(level=[0, 1]):
        x, y = g["a"].to_numpy(), g["b"].to_numpy()
        rows.append({"centre": centre, "inference": inference, "n_lesion": len(x),
                     "dice_a": x.mean(), "dice_b": y.mean(), "b_minus_a": y.mean() - x.mean(),
                     "p_wilcoxon": metrics.paired_wilcoxon(y, x)})
    return pd.DataFrame(rows)


def pair(a_dir: Path, b_dir: Path, inference: tuple[str, str] | None = None) -> pd.DataFrame:
    """``pair_frames`` of the per_image.csv of two run folders holding one arm each; with
    ``inference`` (variant of A, variant of B) only those rows, paired with each other."""
    frames = []
    for d in (a_dir, b_dir):
        path = d / "per_image.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a run folder of benchmarks/external_validation.py?)")
        pi = pd.read_csv(path)
        arms = pi["arm"].unique()
        if len(arms) != 1:
            raise ValueError(f"{path}: holds arms {list(arms)}; pair runs of one arm each")
        frames.append(pi)
    if inference is not None:
        label = " vs ".join(inference)
        for i, (d, variant) in enumerate(zip((a_dir, b_dir), inference)):
            kept = frames[i][frames[i]["inference"] == variant]
            if kept.empty:
                raise ValueError(f"{d / 'per_image.csv'}: no rows with inference {variant!r}")
            frames[i] = kept.assign(inference=label)
    return pair_frames(frames[0], frames[1], (str(a_dir), str(b_dir)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path, help="reference run folder (e.g. the plain arm)")
    p.add_argument("run_b", type=Path, help="compared run folder (e.g. the consistency arm)")
    p.add_argument("--inference-a", help="pair only this inference variant of A (e.g. raw) ...")
    p.add_argument("--inference-b", help="... with this one of B (e.g. flip+shift)")
    args = p.parse_args(argv)
    if (args.inference_a is None) != (args.inference_b is None):
        p.error("--inference-a and --inference-b go together")
    variants = None if args.inference_a is None else (args.inference_a, args.inference_b)
    try:
        table = pair(args.run_a, args.run_b, variants)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"A = {args.run_a}, B = {args.run_b}; Dice over lesion images")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
