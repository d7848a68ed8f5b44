"""Do the differentiable BI-RADS features agree with the radiologists? (BrEaST, ground-truth masks)

Each feature of ``common.birads`` is computed on the *ground-truth* mask (as P) and the image of
every BrEaST lesion, resized like training data (``to_tensors`` at the settings'
``data.image_size``: ``--preset``, default ``paper``, 128 px, and ``--set``), and scored by ROC
AUC against the radiologists' own descriptor in the clinical sheet and against the pathology
(Classification).
Every AUC is oriented in the clinical direction fixed in advance (score = CLINICAL_SIGN × feature,
positive class = the more suspicious descriptor), never flipped afterwards: < 0.5 means the feature
disagrees with the lexicon. 95 % CIs: percentile bootstrap over lesions.

BrEaST has no orientation (parallel / not parallel) column, so orientation is scored against the
BI-RADS category (4c/5 vs 2/3) and malignancy. Texture uses Echogenicity heterogeneous vs the
homogeneous patterns (an-, hypo-, iso-, hyperechoic; "complex cystic/solid" left out); posterior
uses shadowing vs none/enhancement ("combined" left out). The last rows score the untrained prior
φ (weights ±0.5 in the clinical direction, standardised over these lesions) against malignancy.

    python -m benchmarks.birads_vs_radiologists --out results/birads_vs_radiologists.csv
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from benchmarks.perfutil import add_settings_args, settings_from_args
from common.birads import CLINICAL_SIGN, FEATURE_NAMES, BiradsPrior, birads_features
from common.config import PAPER_FEATURES
from common.data import discover_centres, load_centre
from common.data.tensors import to_tensors
from common.records import Case, Label

log = logging.getLogger(__name__)
DEFAULT_PRESET = "paper"  # 128 px, the published model's working size

Rule = Callable[[Case], bool | None]  # True: suspicious class, False: reference, None: excluded


def _field(case: Case, name: str) -> str:
    return str(case.descriptors.get(name, "")).strip().lower()


def _split(name: str, pos: Callable[[str], bool], neg: Callable[[str], bool]) -> Rule:
    def rule(case: Case) -> bool | None:
        v = _field(case, name)
        return True if pos(v) else False if neg(v) else None

    return rule


def _margin_words(v: str) -> set[str]:
    return {w.strip() for w in v.replace("not circumscribed -", "").split("&")}


HOMOGENEOUS = {"anechoic", "hypoechoic", "isoechoic", "hyperechoic"}
RULES: dict[str, Rule] = {
    "Shape irregular vs oval/round": _split(
        "Shape", lambda v: v == "irregular", lambda v: v in {"oval", "round"}),
    "Margin not circumscribed vs circumscribed": _split(
        "Margin", lambda v: v.startswith("not circumscribed"), lambda v: v == "circumscribed"),
    "Margin spiculated/angular/microlobulated vs circumscribed": _split(
        "Margin",
        lambda v: v.startswith("not circumscribed")
        and bool(_margin_words(v) & {"spiculated", "angular", "microlobulated"}),
        lambda v: v == "circumscribed"),
    "Margin indistinct vs circumscribed": _split(
        "Margin", lambda v: v.startswith("not circumscribed") and "indistinct" in _margin_words(v),
        lambda v: v == "circumscribed"),
    "Echogenicity heterogeneous vs homogeneous": _split(
        "Echogenicity", lambda v: v == "heterogeneous", lambda v: v in HOMOGENEOUS),
    "Posterior shadowing vs none/enhancement": _split(
        "Posterior_features", lambda v: v == "shadowing", lambda v: v in {"no", "enhancement"}),
    "BI-RADS 4c/5 vs 2/3": _split(
        "BIRADS", lambda v: v in {"4c", "5"}, lambda v: v in {"2", "3"}),
    "Malignant vs benign (pathology)": lambda c: (
        None if c.label == Label.NORMAL else c.label == Label.MALIGNANT),
}

#: (feature or prior, descriptor) rows of the table, descriptor rows first.
ROWS: tuple[tuple[str, str], ...] = (
    ("compactness", "Shape irregular vs oval/round"),
    ("roughness", "Margin not circumscribed vs circumscribed"),
    ("roughness", "Margin spiculated/angular/microlobulated vs circumscribed"),
    ("margin_sharpness", "Margin indistinct vs circumscribed"),
    ("texture", "Echogenicity heterogeneous vs homogeneous"),
    ("posterior", "Posterior shadowing vs none/enhancement"),
    ("orientation", "BI-RADS 4c/5 vs 2/3"),
    *((f, "Malignant vs benign (pathology)") for f in FEATURE_NAMES),
    ("prior φ (paper 4)", "Malignant vs benign (pathology)"),
    ("prior φ (all 7)", "Malignant vs benign (pathology)"),
)


@dataclass(frozen=True)
class Row:
    feature: str
    descriptor: str
    n: int
    n_pos: int
    auc: float
    ci_lo: float
    ci_hi: float


def bootstrap_auc(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % CI of the AUC, resampling lesions; one-class resamples are skipped.

    All resamples at once through the Mann–Whitney form (average ranks for ties), which equals
    ``roc_auc_score`` on each resample.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), (n_boot, len(y)))
    yb, sb = y[idx].astype(bool), s[idx]
    n_pos = yb.sum(1)
    ok = (n_pos > 0) & (n_pos < len(y))
    if not ok.any():
        return float("nan"), float("nan")
    yb, sb, n_pos = yb[ok], sb[ok], n_pos[ok]
    ranks = rankdata(sb, axis=1)
    n_neg = len(y) - n_pos
    aucs = ((ranks * yb).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


@torch.no_grad()
def lesion_scores(cases: Sequence[Case], size: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Clinically signed feature scores (and untrained priors) per case, from the true masks."""
    data = to_tensors(list(cases), size)
    feats = torch.cat([
        birads_features(data.masks[i : i + batch_size], data.images[i : i + batch_size],
                        data.spacing_mm[i : i + batch_size], FEATURE_NAMES)
        for i in range(0, len(data), batch_size)
    ]).double()
    scores = {n: (CLINICAL_SIGN[n] * feats[:, k]).numpy() for k, n in enumerate(FEATURE_NAMES)}
    for label, names in (("prior φ (paper 4)", PAPER_FEATURES), ("prior φ (all 7)", FEATURE_NAMES)):
        cols = [FEATURE_NAMES.index(n) for n in names]
        prior = BiradsPrior(names).double()
        prior.train()(feats[:, cols])  # first update = exact mean/var of these lesions
        scores[label] = prior.eval()(feats[:, cols]).numpy()
    return scores


def evaluate(cases: Sequence[Case], size: int, n_boot: int, seed: int) -> list[Row]:
    cases = [c for c in cases if c.has_lesion]
    scores = lesion_scores(cases, size)
    rows = []
    for feature, descriptor in ROWS:
        labels = [RULES[descriptor](c) for c in cases]
        keep = np.array([v is not None for v in labels])
        y = np.array([bool(v) for v in labels], dtype=int)[keep]
        s = scores[feature][keep]
        if keep.sum() == 0 or y.min() == y.max():
            nan = float("nan")
            rows.append(Row(feature, descriptor, int(keep.sum()), int(y.sum()), nan, nan, nan))
            continue
        auc = float(roc_auc_score(y, s))
        rows.append(Row(feature, descriptor, int(keep.sum()), int(y.sum()), auc,
                        *bootstrap_auc(y, s, n_boot, seed)))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| feature | descriptor (positive vs reference) | n (pos) | AUC | 95% CI |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.feature} | {r.descriptor} | {r.n} ({r.n_pos}) | {r.auc:.3f} | "
                     f"{r.ci_lo:.3f}–{r.ci_hi:.3f} |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["feature", "descriptor", "n", "n_pos", "auc", "ci_lo", "ci_hi"])
        for r in rows:
            writer.writerow([r.feature, r.descriptor, r.n, r.n_pos, f"{r.auc:.4f}",
                             f"{r.ci_lo:.4f}", f"{r.ci_hi:.4f}"])


def default_data_root() -> Path:
    env = os.environ.get("FEDBUS_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=default_data_root(),
                    help="folder holding BrEaST/ (default ../shared/data or $FEDBUS_DATA_ROOT)")
    add_settings_args(ap, DEFAULT_PRESET)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="CSV to write the table to")
    args = ap.parse_args(argv)
    size = settings_from_args(args).experiment.data.image_size
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    folder = discover_centres(args.data_root).get("BrEaST")
    if folder is None:
        print(f"no BrEaST folder under {args.data_root}")
        return 2
    cases = load_centre("BrEaST", folder)
    rows = evaluate(cases, size, args.n_boot, args.seed)
    print(f"BrEaST ({folder}), ground-truth masks at {size} px, {len(cases)} images; "
          f"AUC oriented in the clinical direction, 95% bootstrap CI ({args.n_boot} resamples)\n")
    print(markdown(rows))
    if args.out is not None:
        write_csv(rows, args.out)
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
