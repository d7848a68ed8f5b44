"""Local training throughput against a bare PyTorch loop and against the machine's limit; the
data path against the trainer; CPU options (channels-last, threads, inference mode, image size).

Every arm trains the network of the settings (default: ``cpu-fast``'s small U-Net at 128 px,
depth 4, batch 16; any ``--preset``/``--set``) from the same initial weights on
the same synthetic images held in memory, with the settings' loss and augmentation. Arms run
interleaved, ``--repeats`` times, after one warm-up run each. On a machine shared with
other jobs, wall time mostly measures the other jobs: rates are images per CPU second of this
process (one thread, so CPU time is time on the core), and a ratio is the median over repeats of
the ratio of two runs adjacent in time. Wall-clock rates are printed alongside; the thread
settings (fresh processes) can only be compared on wall time.

1. trainer  = ``common.train.train_local`` (wall time of the whole call, set-up included)
   bare     = the same step written inline: index a batch, ``augment_batch`` + ``normalise``,
              forward, ``MultiTaskLoss``, backward, clip, stock ``torch.optim`` AdamW (or SGD)
              step, cosine LR schedule
   ratio trainer / bare (goal >= 0.95), with and without augmentation.
   limit    = matmul GFLOP/s (``torch.mm`` n x n, float32, same threads) / training FLOPs per image
              (forward + backward convolutions and matmuls, ``torch.utils.flop_counter``);
              fraction = trainer images/s / limit.
2. loader   = ``batches(..., augment=<ranges>)`` alone (indexing, augmentation, normalisation: the
              trainer's whole data path), against the trainer's consumption; ``to_tensors`` and
              ``cached_tensors`` (miss: build + save; hit: load) in images/s.
6. options  = trainer with channels-last, at 96 and 64 px (those below the settings' size); 1 vs
              2 threads with OpenMP's default and passive wait policy (fresh processes);
              ``predict`` under inference_mode (what it uses) against no_grad and grad-enabled.

    python benchmarks/perf_train.py [--images 32] [--epochs 1] [--repeats 5] [--quick]
        [--preset NAME|FILE] [--set data.image_size=96 ...]
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perfutil import (  # noqa: E402
    OUT_DIR, PeakMemory, add_settings_args, format_table, machine_note, settings_from_args, write_csv,
    write_settings,
)
from common.config import AugmentConfig, LossConfig, TrainConfig, replace  # noqa: E402
from common.data.synthetic import make_centre  # noqa: E402
from common.data.augment import augment_batch  # noqa: E402
from common.data.tensors import TensorData, batches, cached_tensors, normalise, to_tensors  # noqa: E402
from common.evaluate import predict  # noqa: E402
from common.federation import build_experiment_model  # noqa: E402
from common.losses import MultiTaskLoss  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.train import balanced_pos_weight, train_local  # noqa: E402

#: What this benchmark has always measured: the small U-Net of ``ModelConfig()`` (depth 4) at
#: 128 px, batch 16, on top of ``cpu-fast`` (used when no ``--preset`` is given).
DEFAULT_PRESET = "cpu-fast"
DEFAULT_SET = ("data.image_size=128", "model.depth=4", "train.batch_size=16")
QUICK_SET = ("data.image_size=64",)


# ----------------------------------------------------------------------------- the two loops
def bare_loop(model: nn.Module, data: TensorData, cfg: TrainConfig, loss_cfg: LossConfig,
              geometry: AugmentConfig | None) -> None:
    """What ``train_local`` computes, inline, without its bookkeeping (one parameter group and
    no warm-up: neither changes the cost of a step)."""
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = MultiTaskLoss(loss_cfg, balanced_pos_weight(data.malignant))
    if not loss_fn.trains_prior():
        for p in model.prior.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = math.ceil(len(data) / cfg.batch_size) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    n = len(data)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            raw, mask = data.images[idx], data.masks[idx]
            if geometry is not None:
                raw, mask = augment_batch(raw, mask, gen, geometry)
            batch = {"image": normalise(raw), "raw": raw, "mask": mask, "malignant": data.malignant[idx],
                     "has_lesion": mask.flatten(1).amax(1) > 0, "spacing_mm": data.spacing_mm[idx]}
            x = batch["image"]
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            mask_logits, cls_logit = model(x)
            loss, _parts = loss_fn(mask_logits, cls_logit, batch, model.prior)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
            opt.step()
            sched.step()


def trainer_run(model: nn.Module, data: TensorData, cfg: TrainConfig, loss_cfg: LossConfig,
                geometry: AugmentConfig | None) -> None:
    train_local(model, data, cfg, loss_cfg, device="cpu", augment=geometry)


# ----------------------------------------------------------------------------- measurements
def matmul_gflops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    """Best-of float32 n x n matmul throughput (GFLOP/s) with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_image(model: nn.Module, size: int, batch: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of convolutions and matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train()
    x = torch.randn(batch, 1, size, size)
    with FlopCounterMode(display=False) as fc:
        mask_logits, cls_logit = m(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        mask_logits, cls_logit = m(x)
        (mask_logits.mean() + cls_logit.mean()).backward()
    return fwd / batch, fc.get_total_flops() / batch


def synthetic(n: int, size: int, seed: int = 0) -> list:
    """Cases of two synthetic centres (both classes, normals, lesions of every size)."""
    half = n // 2
    return make_centre("SynPL", half, size=size, seed=seed) + make_centre("SynEG", n - half, size=size, seed=seed)


Arm = Callable[[], tuple[float, float]]  # runs once: (images per wall second, per CPU second)


def _rates(images: int, wall0: float, cpu0: float) -> tuple[float, float]:
    """(images / wall seconds, images / process CPU seconds) since (wall0, cpu0). With one
    thread the CPU rate is what the code achieves while it runs, whatever else the shared
    machine is doing; the wall rate also counts the time other processes held the core."""
    return images / (time.perf_counter() - wall0), images / max(time.process_time() - cpu0, 1e-9)


def train_arm(run: Callable, init: nn.Module, data: TensorData, cfg: TrainConfig, loss_cfg: LossConfig,
              geometry: AugmentConfig | None) -> Arm:
    """``run`` (trainer_run or bare_loop) on a fresh copy of ``init``; augmentation ``geometry``
    (None: off)."""
    def once() -> tuple[float, float]:
        model = copy.deepcopy(init)
        t, c = time.perf_counter(), time.process_time()
        run(model, data, cfg, loss_cfg, geometry)
        return _rates(len(data) * cfg.epochs, t, c)
    return once


def loader_arm(data: TensorData, cfg: TrainConfig, epochs: int, geometry: AugmentConfig | None) -> Arm:
    def once() -> tuple[float, float]:
        torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
        gen = torch.Generator().manual_seed(0)
        t, c, seen = time.perf_counter(), time.process_time(), 0
        for _ in range(epochs):
            for b in batches(data, cfg.batch_size, shuffle=True, generator=gen, augment=geometry):
                seen += int(b["mask"].shape[0])
        return _rates(seen, t, c)
    return once


def predict_arm(init: nn.Module, data: TensorData, threads: int, mode: str) -> Arm:
    """``predict`` as is (inference_mode), or the same loop under no_grad / with autograd on."""
    def once() -> tuple[float, float]:
        torch.set_num_threads(threads)
        model = init.eval()
        t, c = time.perf_counter(), time.process_time()
        if mode == "inference_mode":
            predict(model, data, batch_size=32, device="cpu")
        else:
            ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
            with ctx:
                for s in range(0, len(data), 32):
                    m, k = model(normalise(data.images[s:s + 32]))
                    torch.sigmoid(m), torch.sigmoid(k)
        return _rates(len(data), t, c)
    return once


def interleaved(arms: dict[str, Arm], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """One warm-up call per arm, then ``repeats`` rounds over all arms in turn (load on a shared
    machine drifts; interleaving spreads it over every arm alike)."""
    for arm in arms.values():
        arm()
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for r in range(repeats):
        for name, arm in arms.items():
            out[name].append(arm())
            logging.info("repeat %d %s %.2f img/s wall, %.2f img/CPU-s", r + 1, name, *out[name][-1])
    return out


def paired(results: dict[str, list[tuple[float, float]]], a: str, b: str, k: int = 1) -> float:
    """Median over repeats of a_i / b_i (runs adjacent in time), on rate ``k`` (1: CPU, 0: wall)."""
    return statistics.median(x[k] / y[k] for x, y in zip(results[a], results[b]))


def cache_rates(n: int, size: int) -> dict[str, float]:
    """images/s of ``cached_tensors`` on a miss (cases made by ``common.data.synthetic``, the
    stand-in for reading PNGs, + ``to_tensors`` + atomic save) and on a hit (``torch.load``),
    and of ``to_tensors`` alone (cases already in memory)."""
    cases = synthetic(n, size)
    out = {}
    t = time.perf_counter()
    to_tensors(cases, size)
    out["to_tensors"] = n / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cached_tensors(lambda: synthetic(n, size), size, tmp, "bench")
        out["cache_miss"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        cached_tensors(lambda: synthetic(n, size), size, tmp, "bench")
        out["cache_hit"] = n / (time.perf_counter() - t)
    return out


THREAD_SETTINGS = (("1 thread", 1, None), ("2 threads", 2, None), ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, "PASSIVE"))


def thread_probe(args: argparse.Namespace, settings: Settings) -> dict[str, list[tuple[float, float]]]:
    """Trainer images/s in fresh processes per thread setting (OpenMP reads OMP_WAIT_POLICY
    when torch loads, so each setting needs its own process), interleaved ``repeats`` times.
    The children load these very settings from a resolved file."""
    out: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in THREAD_SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_settings(settings, Path(tmp) / "settings.yaml")
        for _ in range(min(args.repeats, 2)):
            for label, threads, policy in THREAD_SETTINGS:
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
                if policy:
                    env["OMP_WAIT_POLICY"] = policy
                cmd = [sys.executable, __file__, "--child-threads", str(threads), "--preset", str(path),
                       "--images", str(args.images), "--epochs", str(args.epochs)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                wall = float(res.stdout.strip().splitlines()[-1])
                out[label].append((wall, float("nan")))  # CPU rate: meaningless across thread counts
    return out


def bench_train(settings: Settings, epochs: int, threads: int) -> TrainConfig:
    """The settings' training section as every arm runs it: ``epochs`` per timed run, ``threads``
    intra-op threads, on the CPU, contiguous (channels-last is an arm), no progress bar."""
    return replace(settings.experiment.train, epochs=epochs, num_threads=threads, device="cpu",
                   progress=False, channels_last=False)


def child_rate(args: argparse.Namespace, settings: Settings) -> float:
    """The trainer arm alone (one warm-up, one timed run) with ``--child-threads`` threads."""
    exp = settings.experiment
    torch.manual_seed(0)
    init = build_experiment_model(exp)
    size = exp.data.image_size
    cfg = bench_train(settings, args.epochs, args.child_threads)
    data = to_tensors(synthetic(args.images, size), size)
    arm = train_arm(trainer_run, init, data, cfg, exp.loss, exp.data.augmentation)
    arm()
    return arm()[0]


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET, DEFAULT_SET)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed run (replaces train.epochs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every in-process arm (default 1: what a simulated site uses)")
    p.add_argument("--child-threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-options", action="store_true", help="skip the item-6 arms")
    p.add_argument("--quick", action="store_true",
                   help="64 px, 16 images, 1 epoch, 1 repeat, no 96 px arm, no thread probe")
    p.add_argument("--out", type=Path, default=OUT_DIR / "perf_train.csv")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.repeats = 16, 1, 1
    settings = settings_from_args(args, QUICK_SET if args.quick else ())
    if args.child_threads:
        print(child_rate(args, settings))
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    print(machine_note())
    exp = settings.experiment
    size, loss, geometry = exp.data.image_size, exp.loss, exp.data.augmentation
    torch.manual_seed(0)
    init = build_experiment_model(exp)
    cfg = bench_train(settings, args.epochs, args.threads)
    data = to_tensors(synthetic(args.images, size), size)
    arms: dict[str, Arm] = {
        "trainer": train_arm(trainer_run, init, data, cfg, loss, geometry),
        "bare": train_arm(bare_loop, init, data, cfg, loss, geometry),
        "trainer_noaug": train_arm(trainer_run, init, data, cfg, loss, None),
        "bare_noaug": train_arm(bare_loop, init, data, cfg, loss, None),
        "loader": loader_arm(data, cfg, max(args.epochs, 2), geometry),
    }
    if not args.no_options:
        arms["trainer_channels_last"] = train_arm(trainer_run, init, data, replace(cfg, channels_last=True),
                                                  loss, geometry)
        for s in (96, 64):
            if s < size and s % exp.model.size_multiple == 0 and not (args.quick and s == 96):
                small = to_tensors(synthetic(args.images, s), s)
                arms[f"trainer_{s}px"] = train_arm(trainer_run, init, small, cfg, loss, geometry)
        for mode in ("inference_mode", "no_grad", "grad"):
            arms[f"predict_{mode}"] = predict_arm(init, data, args.threads, mode)
    with PeakMemory() as mem:
        results = interleaved(arms, args.repeats)
    if not args.no_options and not args.quick:
        results.update({f"trainer_{k}": v for k, v in thread_probe(args, settings).items()})
    med = {k: statistics.median(v[1] for v in vals) for k, vals in results.items()}  # CPU rate
    wall = {k: statistics.median(v[0] for v in vals) for k, vals in results.items()}

    gflops = matmul_gflops(args.threads)
    fwd, train_flops = flops_per_image(init, size, cfg.batch_size)
    limit = gflops * 1e9 / train_flops
    rates = cache_rates(args.images, size)
    t = med["trainer"]

    def ratio_row(item: str, measure: str, a: str, b: str, goal: str, k: int = 1) -> dict:
        rate = med if k else wall
        unit = "img/CPU-s" if k else "img/s wall"
        return {"item": item, "measure": measure, "value": paired(results, a, b, k),
                "detail": f"{rate[a]:.2f} vs {rate[b]:.2f} {unit} (wall {wall[a]:.2f} vs {wall[b]:.2f})",
                "goal": goal}

    rows = [
        ratio_row("1", "trainer / bare loop (augmentation on)", "trainer", "bare", ">= 0.95"),
        ratio_row("1", "trainer / bare loop (augmentation off)", "trainer_noaug", "bare_noaug", ">= 0.95"),
        {"item": "1", "measure": "trainer / machine limit", "value": t / limit,
         "detail": f"limit {limit:.1f} img/s = {gflops:.1f} GFLOP/s matmul ({args.threads} thread) / "
                   f"{train_flops / 1e9:.3f} GFLOP per image (fwd {fwd / 1e9:.3f}); trainer {t:.2f} img/CPU-s",
         "goal": "report"},
        ratio_row("2", "loader / trainer images/s", "loader", "trainer", ">> 1"),
        {"item": "2", "measure": "cached_tensors hit / miss images/s", "value": rates["cache_hit"] / rates["cache_miss"],
         "detail": "miss (make + to_tensors + save) {cache_miss:.0f}, hit {cache_hit:.0f}, to_tensors alone "
                   "{to_tensors:.0f} img/s".format(**rates), "goal": "> 1"},
        {"item": "2", "measure": "cache hit / trainer images/s", "value": rates["cache_hit"] / t,
         "detail": "loading a site's tensors from the cache vs training on them", "goal": ">> 1"},
    ]
    if not args.no_options:
        for name, label in (("trainer_channels_last", "channels-last"),
                            ("trainer_96px", "96 px"), ("trainer_64px", "64 px")):
            if name in med:
                rows.append(ratio_row("6", f"trainer {label} / default", name, "trainer", "keep if > 1"))
        for mode in ("no_grad", "grad"):
            rows.append(ratio_row("6", f"predict inference_mode / {mode}", "predict_inference_mode",
                                  f"predict_{mode}", "keep if >= 1"))
        one = "trainer_1 thread"
        for label, _, _ in THREAD_SETTINGS[1:]:
            name = f"trainer_{label}"
            if name in results:
                rows.append(ratio_row("6", f"trainer {label} / 1 thread (fresh processes, wall)", name, one,
                                      "keep if > 1", k=0))
    print(f"{exp.model.arch} network, size {size} px, {args.images} images, batch {cfg.batch_size}, "
          f"{args.epochs} epoch(s) per run, {args.repeats} repeat(s), {args.threads} threads; "
          f"peak RSS {mem.peak_mib:.0f} MiB")
    print(format_table(rows))
    print()
    print(format_table([{"arm": k, "img_per_cpu_s": med[k], "img_per_wall_s": wall[k],
                         "runs (wall/cpu)": " ".join(f"{a:.1f}/{b:.1f}" for a, b in results[k])} for k in results]))
    common = {"arch": exp.model.arch, "size": size, "images": args.images, "batch": cfg.batch_size,
              "threads": args.threads, "epochs": args.epochs, "repeats": args.repeats}
    write_csv([{**common, **r} for r in rows], args.out)
    write_csv([{**common, "arm": k, "img_per_cpu_s": med[k], "img_per_wall_s": wall[k],
                "runs_wall": " ".join(f"{a:.3f}" for a, _ in results[k]),
                "runs_cpu": " ".join(f"{b:.3f}" for _, b in results[k])} for k in results]
              + [{**common, "arm": "matmul_gflops", "img_per_cpu_s": gflops},
                 {**common, "arm": "limit_img_s", "img_per_cpu_s": limit}],
              args.out.with_name(args.out.stem + "_arms.csv"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
