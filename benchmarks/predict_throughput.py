"""Predict throughput: images per second of ``fedbus-predict``'s two backends on the network of
the ``recommended`` preset (Lite0, 160 px; any ``--preset``/``--set``), random weights.

The same model file is predicted by PyTorch (``common.predictgraph.TorchBackend``) and, exported
with ``export_onnx``, by ONNX Runtime (``common.prediction.OnnxBackend``), each with
``--threads`` threads: a single model without test-time views, and with the preset's views
(mirror and depth shifts: TTA), at batch sizes 1 and 8. What is timed is ``backend.run`` on
preprocessed images (B,1,S,S): the graph predict runs (network, BI-RADS features, prior), not
file decoding or PNG writing. Each arm is warmed up once, then the arms take turns
(``--repeats``); a rate is the median, and a ratio is the median of per-repeat ratios against
PyTorch single model at the same batch size (runs adjacent in time, same machine load).
``cpu_util`` is process CPU over wall time: below ``--threads``, other processes held the cores.
On a busy machine run it with ``OMP_WAIT_POLICY=PASSIVE`` (as deploy/ does; printed in the
header): with OpenMP's default spin-waiting, PyTorch with 2 threads on 2 oversubscribed cores
spends most of its time waiting for a preempted thread (benchmarks/perf_train.py measures this).

    python benchmarks/predict_throughput.py [--images 48] [--repeats 1] [--threads 2]
        [--batch-sizes 1 8] [--preset NAME|FILE] [--set data.image_size=128 ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.perf_train import interleaved, paired  # noqa: E402
from benchmarks.perfutil import (  # noqa: E402
    OUT_DIR,
    add_settings_args,
    format_table,
    machine_note,
    settings_from_args,
    write_csv,
)
from common.config import ExperimentConfig, replace  # noqa: E402
from common.federation import build_experiment_model  # noqa: E402
from common.loaded_model import load_model  # noqa: E402
from common.modelfile import save_model  # noqa: E402
from common.predictgraph import TorchBackend, export_onnx  # noqa: E402
from common.prediction import Backend, OnnxBackend  # noqa: E402

DEFAULT_PRESET = "recommended"
Arm = Callable[[], tuple[float, float]]


def model_files(exp: ExperimentConfig, folder: Path) -> dict[str, Path]:
    """{"single": no test-time views, "tta": the settings' views}: one random-weight network
    (no pretrained file is read: the speed does not depend on the weights) saved twice."""
    torch.manual_seed(0)
    exp = replace(exp, **{"model.pretrained_path": None})
    net = build_experiment_model(exp).eval()
    single = replace(exp, **{"inference.flip": False, "inference.depth_shifts": (), "inference.ensemble": False})
    return {"single": save_model(folder / "single.pt", net, single, name="single"),
            "tta": save_model(folder / "tta.pt", net, exp, name="tta")}


def backend_arm(backend: Backend, images: np.ndarray, batch: int) -> Arm:
    """All ``images`` through ``backend.run`` in batches of ``batch``: (img/s wall, img/CPU-s)."""
    def once() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(images), batch):
            backend.run(images[i:i + batch])
        n = len(images)
        return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)
    return once


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_args(p, DEFAULT_PRESET)
    p.add_argument("--images", type=int, default=48, help="images per timed run and arm")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", type=Path, default=OUT_DIR / "predict_throughput.csv")
    args = p.parse_args(argv)
    exp = settings_from_args(args).experiment
    threads = torch.get_num_threads()
    try:
        return _run(args, exp)
    finally:  # a caller's (pytest's) thread setting is left as it was
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, exp: ExperimentConfig) -> int:
    size, views = exp.data.image_size, exp.inference
    images = np.random.default_rng(0).random((args.images, 1, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files(exp, Path(tmp))
        backends: dict[tuple[str, str], Backend] = {}
        diffs: dict[str, float | None] = {}
        for kind, path in files.items():
            model = load_model(path)
            backends[("pytorch", kind)] = TorchBackend(model, "cpu", args.threads)
            onnx_path = path.with_suffix(".onnx")
            diffs[kind] = export_onnx(model, onnx_path)
            backends[("onnxruntime", kind)] = OnnxBackend(onnx_path, "cpu", args.threads)
        arms = {(engine, kind, b): backend_arm(backend, images, b)
                for b in args.batch_sizes for (engine, kind), backend in backends.items()}
        names = {key: "/".join(map(str, key)) for key in arms}
        policy = os.environ.get("OMP_WAIT_POLICY", "default")
        print(f"{machine_note()} OMP_WAIT_POLICY={policy}")
        if policy != "PASSIVE" and os.getloadavg()[0] > (os.cpu_count() or 1):
            print("note: the machine is oversubscribed and OpenMP spin-waits: PyTorch's rates include "
                  "waiting for preempted threads (set OMP_WAIT_POLICY=PASSIVE)")
        results = interleaved({names[k]: arm for k, arm in arms.items()}, args.repeats)
    rows = []
    for (engine, kind, b), name in names.items():
        ref = names[("pytorch", "single", b)]
        wall = statistics.median(r[0] for r in results[name])
        cpu = statistics.median(r[1] for r in results[name])
        rows.append({"engine": engine, "model": kind, "batch": b, "img_per_s": wall,
                     "ratio_vs_pytorch_single": paired(results, name, ref, k=0),
                     "img_per_cpu_s": cpu, "cpu_util": wall / cpu,
                     "onnx_max_abs_diff": diffs[kind] if engine == "onnxruntime" else ""})
    rows.sort(key=lambda r: (r["batch"], r["model"], r["engine"] != "pytorch"))
    m = exp.model
    n_views = (2 if views.flip else 1) * (1 + len(views.depth_shifts))
    print(f"{m.arch} ({m.encoder_norm}, mask head {m.mask_head}), {size} px, {args.images} images "
          f"per run, {args.repeats} repeat(s), {args.threads} thread(s); tta = {n_views} views "
          f"(flip {views.flip}, depth shifts {list(views.depth_shifts)})")
    print(format_table(rows))
    common = {"arch": m.arch, "size": size, "images": args.images, "threads": args.threads,
              "repeats": args.repeats, "omp_wait_policy": policy}
    write_csv([{**common, **r} for r in rows], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
