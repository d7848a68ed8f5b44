"""Channels-last memory format for the external-validation network (EfficientNet-Lite0 encoder,
folded-BatchNorm affine, MixStyle), training and scoring, against the default (contiguous) format
measured in the same run.

``perf_train.py`` measures the option on the default small U-Net; the recipe of
``benchmarks.external_validation`` trains Lite0, whose depthwise convolutions oneDNN runs faster
in channels-last. Arms (same initial weights, same synthetic images held in memory, one thread):

- train       ``common.train.train_local``, full multi-task loss, augmentation on, batch 8
- train_cl    the same with ``train.channels_last`` (``--channels-last`` of the benchmark)
- predict     ``common.evaluate.predict`` (inference_mode, batch 32)
- predict_cl  the same network converted with ``.to(memory_format=torch.channels_last)``
- tta, tta_cl ``predict`` through ``DepthShiftTTA`` (image, mirror, two shifts) in either format
- tta_cl_fold  tta_cl with the encoder's affines folded into its convolutions (``fold_affine``,
              what ``benchmarks.external_validation.score`` predicts with)
- train_cl_lowres  train_cl on batches shrunk by 0.8 (``train.low_res_epochs``: progressive
              resizing, the cost of one of its early epochs)
- train_cl_half  train_cl with ``model.mask_head="half"`` (no last full-resolution decoder block)
- train_cl_slim, tta_cl_slim, tta_cl_half  train_cl / tta_cl with ``model.mask_head="slim"`` (that
              block with 8 channels) or "half"

Rates are images per CPU second of this process (one thread: time on the core, whatever else
the machine runs); a ratio is the median over repeats of two runs adjacent in time.

    python benchmarks/perf_channels_last.py [--size 160] [--images 32] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perf_train import Arm, _rates, interleaved, paired, synthetic, trainer_run  # noqa: E402
from benchmarks.perfutil import OUT_DIR, format_table, machine_note, write_csv  # noqa: E402
from common.config import AUTO_PRETRAINED, LossConfig, ModelConfig, TrainConfig, replace  # noqa: E402
from common.data.tensors import TensorData, to_tensors  # noqa: E402
from common.evaluate import predict  # noqa: E402
from common.model import build_model  # noqa: E402
from common.nets.efficientnet import fold_affine, lite_package_weights  # noqa: E402
from common.tta import DepthShiftTTA  # noqa: E402


def recipe_model(mask_head: str = "full") -> torch.nn.Module:
    """The external-validation network (ImageNet weights when the pip package is there: the
    speed does not depend on them, only the numbers a reader might print)."""
    weights = AUTO_PRETRAINED if lite_package_weights("lite0") is not None else None
    cfg = ModelConfig(arch="lite0", encoder_norm="affine", mixstyle=0.5, pretrained_path=weights,
                      mask_head=mask_head)
    return build_model(cfg, LossConfig().features)


def train_arm(init: torch.nn.Module, data: TensorData, cfg: TrainConfig) -> Arm:
    def once() -> tuple[float, float]:
        model = copy.deepcopy(init)
        t, c = time.perf_counter(), time.process_time()
        trainer_run(model, data, cfg, LossConfig(), True)
        return _rates(len(data) * cfg.epochs, t, c)
    return once


def predict_arm(init: torch.nn.Module, data: TensorData, channels_last: bool, tta: bool,
                fold: bool = False) -> Arm:
    model = (fold_affine(init) if fold else copy.deepcopy(init)).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = DepthShiftTTA(model, (0.15, 0.3)).eval() if tta else model

    def once() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        predict(net, data, batch_size=32, device="cpu")
        return _rates(len(data), t, c)
    return once


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 px, 8 images, 1 repeat")
    p.add_argument("--out", type=Path, default=OUT_DIR / "perf_channels_last.csv")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.images, args.repeats = 64, 8, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:  # a caller's (pytest's) thread setting is left as it was
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    print(machine_note())
    torch.manual_seed(0)
    init = recipe_model()
    data = to_tensors(synthetic(args.images, args.size), args.size)
    half, slim = recipe_model("half"), recipe_model("slim")  # each arm copies its network
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, num_threads=1, progress=False, device="cpu")
    arms: dict[str, Arm] = {
        "train": train_arm(init, data, cfg),
        "train_cl": train_arm(init, data, replace(cfg, channels_last=True)),
        "predict": predict_arm(init, data, False, False),
        "predict_cl": predict_arm(init, data, True, False),
        "tta": predict_arm(init, data, False, True),
        "tta_cl": predict_arm(init, data, True, True),
        "tta_cl_fold": predict_arm(init, data, True, True, fold=True),
        "train_cl_lowres": train_arm(init, data, replace(cfg, channels_last=True, low_res_epochs=1,
                                                         low_res_scale=0.8)),
        "train_cl_half": train_arm(half, data, replace(cfg, channels_last=True)),
        "train_cl_slim": train_arm(slim, data, replace(cfg, channels_last=True)),
        "tta_cl_slim": predict_arm(slim, data, True, True),
        "tta_cl_half": predict_arm(half, data, True, True),
    }
    results = interleaved(arms, args.repeats)
    cpu = {k: statistics.median(v[1] for v in vals) for k, vals in results.items()}
    rows = [{"measure": f"{name} channels-last / contiguous (img per CPU-s)",
             "value": paired(results, f"{name}_cl", name),
             "detail": f"{cpu[name + '_cl']:.2f} vs {cpu[name]:.2f} img/CPU-s"}
            for name in ("train", "predict", "tta")]
    rows.append({"measure": "tta_cl folded affines / unfolded (img per CPU-s)",
                 "value": paired(results, "tta_cl_fold", "tta_cl"),
                 "detail": f"{cpu['tta_cl_fold']:.2f} vs {cpu['tta_cl']:.2f} img/CPU-s"})
    for arm, text in (("train_cl_lowres", "train_cl shrunk by 0.8 (low_res_epochs) / full size"),
                      ("train_cl_half", "train_cl half mask head / full"),
                      ("train_cl_slim", "train_cl slim mask head / full"),
                      ("tta_cl_half", "tta_cl half mask head / full"),
                      ("tta_cl_slim", "tta_cl slim mask head / full")):
        ref = "tta_cl" if arm.startswith("tta") else "train_cl"
        rows.append({"measure": f"{text} (img per CPU-s)", "value": paired(results, arm, ref),
                     "detail": f"{cpu[arm]:.2f} vs {cpu[ref]:.2f} img/CPU-s"})
    print(f"lite0 (affine, MixStyle 0.5), {args.size} px, {args.images} images, training batch "
          f"{args.batch_size}, {args.repeats} repeat(s), 1 thread")
    print(format_table(rows))
    common = {"size": args.size, "images": args.images, "batch": args.batch_size, "repeats": args.repeats}
    write_csv([{**common, **r} for r in rows], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
