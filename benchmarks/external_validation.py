"""External validation of the published protocol: train on BrEaST only, test on the other centres.

Two arms that differ only in the consistency weight λ: plain multi-task (λ = 0) and with the
BI-RADS consistency loss (λ = 0.5); same seed, same initial weights, same data order. BrEaST is
split into train/validation (grouped by patient and duplicate image, stratified by label); with
``--select val`` (default) the epoch with the best mean of validation Dice and AUC is kept,
with ``--select last`` the last epoch. The chosen weights are then scored, without fine-tuning,
on every other centre found under ``--data-root`` (BUSI, BUS-UCLM; UDIAT when present).

Dice/IoU/HD95 are means over lesion images only; AUC is malignant vs benign+normal over all
images; p_dice is a paired Wilcoxon signed-rank test of per-image Dice against the plain arm.

    python benchmarks/external_validation.py --epochs 40 --size 128 --out runs/external
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from common import metrics
from common.config import ExperimentConfig, replace, to_dict
from common.data import discover_centres, load_centre
from common.data.splits import split_cases
from common.data.tensors import TensorData, to_tensors
from common.device import seed_everything, set_threads
from common.evaluate import evaluate
from common.model import build_model
from common.train import train_local

REPO = Path(__file__).resolve().parents[1]
ARMS = (("plain", 0.0), ("consistency", 0.5))
TRAIN_CENTRE = "BrEaST"


def default_data_root() -> Path:
    return Path(os.environ.get("FEDBUS_DATA_ROOT", REPO.parent / "shared" / "data"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--arch", default="small", choices=["small", "effb1_attention", "lite0"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--select", choices=["val", "last"], default="val")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folder (config.yaml, metrics.csv ...)")
    p.add_argument("--verbose", action="store_true", help="also show the data loaders' warnings")
    return p.parse_args(argv)


def arm_config(args: argparse.Namespace, consistency: float) -> ExperimentConfig:
    return replace(ExperimentConfig(), **{
        "data.image_size": args.size, "data.val_fraction": args.val_fraction, "data.seed": args.seed,
        "model.arch": args.arch, "loss.consistency": consistency,
        "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "train.seed": args.seed, "train.device": args.device, "train.num_threads": args.threads,
        "train.progress": False,
    })


def selection_score(summary: dict[str, float]) -> float:
    vals = [summary["dice"], summary["auc"]]
    finite = [v for v in vals if np.isfinite(v)]
    return float(np.mean(finite)) if finite else -np.inf


def run_arm(name: str, cfg: ExperimentConfig, train: TensorData, val: TensorData,
            select: str) -> tuple[torch.nn.Module, int, list[dict]]:
    """Train one arm; returns (model with the selected weights, selected epoch, history)."""
    seed_everything(cfg.train.seed)  # identical initial weights in both arms
    model = build_model(cfg.model, cfg.loss.features, sign_constrained=cfg.loss.sign_constrained)
    best = {"score": -np.inf, "epoch": 0, "state": None}
    history: list[dict] = []

    def on_epoch_end(epoch: int, record: dict) -> None:
        summ = evaluate(model, val, device=cfg.train.device).summary
        history.append({"arm": name, **record, "val_dice": summ["dice"], "val_auc": summ["auc"]})
        print(f"  [{name}] epoch {epoch:3d} loss {record['loss']:.4f} val dice "
              f"{summ['dice']:.3f} auc {summ['auc']:.3f} ({record['seconds']:.1f}s)", flush=True)
        s = selection_score(summ)
        if select == "last" or s >= best["score"]:
            best.update(score=s, epoch=epoch, state=copy.deepcopy(model.state_dict()))

    train_local(model, train, cfg.train, cfg.loss, augment=cfg.data.augment, desc=name,
                on_epoch_end=on_epoch_end)
    model.load_state_dict(best["state"])
    return model, int(best["epoch"]), history


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # documented repairs (resized masks, dropped duplicates): counts suffice
        logging.getLogger("common.data").setLevel(logging.ERROR)
    set_threads(args.threads)
    centres = discover_centres(args.data_root)
    if TRAIN_CENTRE not in centres:
        print(f"{args.data_root}: no {TRAIN_CENTRE} folder found", file=sys.stderr)
        return 2
    tests = [c for c in centres if c != TRAIN_CENTRE]
    out = args.out or REPO / "runs" / f"external_validation_{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    breast = load_centre(TRAIN_CENTRE, centres[TRAIN_CENTRE], strict=False)
    split = split_cases(breast, args.val_fraction, seed=args.seed)
    train, val = to_tensors(split.train, args.size), to_tensors(split.val, args.size)
    external = {c: to_tensors(load_centre(c, centres[c], strict=False), args.size) for c in tests}
    print(f"data ({time.perf_counter() - t0:.0f}s): {TRAIN_CENTRE} train {len(train)} / val "
          f"{len(val)}; " + ", ".join(f"{c} {len(d)}" for c, d in external.items()), flush=True)

    cfgs = {name: arm_config(args, lam) for name, lam in ARMS}
    (out / "config.yaml").write_text(yaml.safe_dump({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_centre": TRAIN_CENTRE, "test_centres": tests,
        "arms": {name: to_dict(cfg) for name, cfg in cfgs.items()},
    }, sort_keys=False), encoding="utf-8")

    rows, per_image, histories = [], [], []
    for name, cfg in cfgs.items():
        print(f"arm {name}: loss.consistency={cfg.loss.consistency}", flush=True)
        model, epoch, hist = run_arm(name, cfg, train, val, args.select)
        histories += hist
        for centre, data in {f"{TRAIN_CENTRE}-val": val, **external}.items():
            res = evaluate(model, data, device=cfg.train.device)
            lo, hi = metrics.bootstrap_ci(res.per_image["dice"].to_numpy(), seed=args.seed)
            rows.append({"arm": name, "centre": centre, "epoch": epoch, **res.summary,
                         "dice_ci_lo": lo, "dice_ci_hi": hi})
            per_image.append(res.per_image.assign(arm=name, eval_centre=centre))

    table = pd.DataFrame(rows)
    pi = pd.concat(per_image, ignore_index=True)
    table["p_dice_vs_plain"] = np.nan
    for i, row in table.iterrows():
        if row["arm"] == "plain":
            continue
        a = pi[(pi.arm == row["arm"]) & (pi.eval_centre == row["centre"])].dice.to_numpy()
        b = pi[(pi.arm == "plain") & (pi.eval_centre == row["centre"])].dice.to_numpy()
        table.loc[i, "p_dice_vs_plain"] = metrics.paired_wilcoxon(a, b)
    table.to_csv(out / "metrics.csv", index=False)
    pi.to_csv(out / "per_image.csv", index=False)
    pd.DataFrame(histories).to_csv(out / "history.csv", index=False)

    print("\nDice over lesion images only; AUC malignant vs benign+normal over all images.")
    show = table[["arm", "centre", "epoch", "n_images", "n_lesion", "dice", "dice_ci_lo",
                  "dice_ci_hi", "auc", "p_dice_vs_plain"]].copy()
    show[["n_images", "n_lesion"]] = show[["n_images", "n_lesion"]].astype(int)
    show["p_dice_vs_plain"] = [f"{v:.2g}" if np.isfinite(v) else "-" for v in show["p_dice_vs_plain"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
