"""Channels-last memory format for the network of the ``recommended`` preset (EfficientNet-Lite0
encoder, folded-BatchNorm affine, MixStyle), training and scoring, against the default
(contiguous) format measured in the same run.

``perf_train.py`` measures the option on the small U-Net; the ``recommended`` preset trains
Lite0, whose depthwise convolutions oneDNN runs faster in channels-last. The network, loss,
augmentation, batch size, image size and inference views are the settings' (default
``recommended``; any ``--preset``/``--set``). Arms (same initial weights, same synthetic images
held in memory, one thread, one epoch per timed run):

- train       ``common.train.train_local``, the settings' loss and augmentation, contiguous
- train_cl    the same with ``train.channels_last`` (as ``recommended`` trains)
- predict     ``common.evaluate.predict`` (inference_mode, batch 32)
- predict_cl  the same network converted with ``.to(memory_format=torch.channels_last)``
- tta, tta_cl ``predict`` through ``common.inference`` (the settings' views: image, mirror, two
              shifts in ``recommended``) in either format
- tta_cl_fold  tta_cl with the encoder's affines folded into its convolutions (``fold_affine``,
              what ``common.inference.build_predictor`` predicts with)
- train_cl_half, tta_cl_half  train_cl / tta_cl with ``model.mask_head="half"`` (no last
              full-resolution decoder block); every other arm has the "full" head

Rates are images per CPU second of this process (one thread: time on the core, whatever else
the machine runs); a ratio is the median over repeats of two runs adjacent in time.

    python benchmarks/perf_channels_last.py [--images 32] [--repeats 3] [--quick]
        [--preset NAME|FILE] [--set data.image_size=128 ...]
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
from benchmarks.perfutil import (  # noqa: E402
    OUT_DIR, add_settings_args, format_table, machine_note, settings_from_args, write_csv,
)
from common.config import AUTO_PRETRAINED, ExperimentConfig, InferenceConfig, TrainConfig, replace  # noqa: E402
from common.data.tensors import TensorData, to_tensors  # noqa: E402
from common.evaluate import predict  # noqa: E402
from common.federation import build_experiment_model  # noqa: E402
from common.inference import build_predictor  # noqa: E402
from common.nets.efficientnet import fold_affine, lite_package_weights  # noqa: E402

DEFAULT_PRESET = "recommended"
QUICK_SET = ("data.image_size=64",)


def recipe_model(exp: ExperimentConfig, mask_head: str = "full") -> torch.nn.Module:
    """The settings' network with ``mask_head``; without the pip package's ImageNet file,
    "auto" weights become random ones (the speed does not depend on them)."""
    model = exp.model
    if model.pretrained_path == AUTO_PRETRAINED and lite_package_weights(model.arch) is None:
        model = replace(model, pretrained_path=None)
    return build_experiment_model(replace(exp, model=replace(model, mask_head=mask_head)))


def train_arm(init: torch.nn.Module, data: TensorData, cfg: TrainConfig, exp: ExperimentConfig) -> Arm:
    def once() -> tuple[float, float]:
        model = copy.deepcopy(init)
        t, c = time.perf_counter(), time.process_time()
        trainer_run(model, data, cfg, exp.loss, exp.data.train_augmentation)
        return _rates(len(data) * cfg.epochs, t, c)
    return once


def predict_arm(init: torch.nn.Module, data: TensorData, views: InferenceConfig, channels_last: bool,
                tta: bool, fold: bool = False) -> Arm:
    model = (fold_affine(init) if fold else copy.deepcopy(init)).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # folded or not as the arm says, never by build_predictor
    net = build_predictor([model], views, fold=False) if tta else model

    def once() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        predict(net, data, batch_size=32, device="cpu")
        return _rates(len(data), t, c)
    return once


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 px, 8 images, 1 repeat")
    p.add_argument("--out", type=Path, default=OUT_DIR / "perf_channels_last.csv")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 8, 1
    exp = settings_from_args(args, QUICK_SET if args.quick else ()).experiment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, exp)
    finally:  # a caller's (pytest's) thread setting is left as it was
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, exp: ExperimentConfig) -> int:
    print(machine_note())
    size, views = exp.data.image_size, exp.inference
    torch.manual_seed(0)
    init = recipe_model(exp, "full")
    data = to_tensors(synthetic(args.images, size), size)
    half = recipe_model(exp, "half")  # each arm copies its network
    # one epoch per timed run, one thread, contiguous: channels-last is an arm
    cfg = replace(exp.train, epochs=1, num_threads=1, progress=False, device="cpu", channels_last=False)
    cl = replace(cfg, channels_last=True)
    arms: dict[str, Arm] = {
        "train": train_arm(init, data, cfg, exp),
        "train_cl": train_arm(init, data, cl, exp),
        "predict": predict_arm(init, data, views, False, False),
        "predict_cl": predict_arm(init, data, views, True, False),
        "tta": predict_arm(init, data, views, False, True),
        "tta_cl": predict_arm(init, data, views, True, True),
        "tta_cl_fold": predict_arm(init, data, views, True, True, fold=True),
        "train_cl_half": train_arm(half, data, cl, exp),
        "tta_cl_half": predict_arm(half, data, views, True, True),
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
    for arm, text in (("train_cl_half", "train_cl half mask head / full"),
                      ("tta_cl_half", "tta_cl half mask head / full")):
        ref = "tta_cl" if arm.startswith("tta") else "train_cl"
        rows.append({"measure": f"{text} (img per CPU-s)", "value": paired(results, arm, ref),
                     "detail": f"{cpu[arm]:.2f} vs {cpu[ref]:.2f} img/CPU-s"})
    m = exp.model
    print(f"{m.arch} ({m.encoder_norm}, MixStyle {m.mixstyle:g}), {size} px, {args.images} images, "
          f"training batch {cfg.batch_size}, {args.repeats} repeat(s), 1 thread")
    print(format_table(rows))
    common = {"arch": m.arch, "size": size, "images": args.images, "batch": cfg.batch_size,
              "repeats": args.repeats}
    write_csv([{**common, **r} for r in rows], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
