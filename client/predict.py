"""``fedbus-predict MODEL INPUT... --out DIR``: a trained model on new ultrasound images.

MODEL: a model file (``.pt``, ``common.modelfile``), an ensemble manifest (``.yaml``) or an ONNX
export (``.onnx``, run with ONNX Runtime: no torch is imported). INPUT: image files, folders
(their image files, recursively) or one manifest CSV (``image[,label][,mask][,spacing_mm]``, the
columns of ``common.data.manifest``). Writes into DIR, per image, ``masks/<name>.png`` (the mask
at the image's own resolution) and ``overlays/<name>.png`` (lesion contour, p, φ, the three
features that pull φ most), ``predictions.csv`` (one row per image) and, for a manifest with
masks or labels, ``metrics.csv`` (Dice, AUC, sensitivity, specificity with bootstrap CIs).
An input that cannot be read is named on one line and skipped; the exit code is then 1.
``fedbus-predict --export onnx MODEL OUT.onnx`` writes the portable export.
Imports common/ only (never flwr); torch only for ``.pt``/``.yaml`` models.
"""
from __future__ import annotations

import os

# before torch: busy-waiting OpenMP threads collapse throughput on a shared workstation
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from client.predict_io import Item, draw_overlay, gather, write_csv, write_png
from common.config import ALL_FEATURES
from common.metrics import binary_auc, bootstrap_ci, dice
from common.postprocess import largest_component, mask_at
from common.prediction import Backend, InputError, ModelInfo, explain, percentile, preprocess, read_input

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedbus-predict", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model file (.pt), ensemble manifest (.yaml) or ONNX export (.onnx)")
    ap.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="image files, folders or one manifest CSV (with --export: the output file)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="output folder (created)")
    ap.add_argument("--export", choices=["onnx"], help="write MODEL as a portable file instead")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    ap.add_argument("--spacing-mm", type=float, default=None,
                    help="mm per pixel of every input (a manifest's spacing_mm column wins)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of metrics.csv CIs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def open_backend(model: Path, device: str, threads: int | None) -> Backend:
    """ONNX Runtime for ``.onnx`` (torch never imported), torch otherwise."""
    if model.suffix.lower() == ".onnx":
        from common.prediction import OnnxBackend

        return OnnxBackend(model, "cpu" if device == "auto" else device, threads)
    from common.loaded_model import load_model
    from common.predictgraph import TorchBackend

    return TorchBackend(load_model(model), device, threads)


def export(model: Path, out: Path) -> int:
    from common.loaded_model import load_model
    from common.predictgraph import export_onnx

    if model.suffix.lower() == ".onnx":
        raise InputError(f"{model}: already an ONNX file")
    diff = export_onnx(load_model(model), out)
    check = ("not checked: onnxruntime is not installed" if diff is None
             else f"ONNX Runtime vs PyTorch max abs diff {diff:.2g}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); {check}")
    return EXIT_OK


def describe_row(item: Item, grey: np.ndarray, outs: tuple[np.ndarray, ...], info: ModelInfo,
                 out: Path) -> dict[str, object]:
    """The predictions.csv row of one image from its backend outputs (mask probabilities
    (1,S,S), p, features (7,), φ); writes its mask (at the image's own size) and overlay."""
    probs, p_mal, feats, phi = outs
    if info.inference.get("largest_component"):
        probs = largest_component(probs[None], info.threshold)[0]
    h, w = grey.shape
    mask = mask_at(probs[0], h, w, info.threshold)
    empty = not mask.any()
    row: dict[str, object] = {"image": str(item.path), "width": w, "height": h,
                              "p_malignant": float(p_mal), "predicted_malignant": int(p_mal >= info.threshold),
                              "phi": math.nan if empty else float(phi), "no_lesion": int(empty),
                              "lesion_area_px": int(mask.sum()),
                              "lesion_area_mm2": float(mask.sum()) * item.spacing_mm ** 2
                              if item.spacing_mm else math.nan}
    stats = info.feature_stats is not None
    for k, name in enumerate(ALL_FEATURES):
        row[name] = math.nan if empty else float(feats[k])
        if stats:
            pct = None if empty else percentile(float(feats[k]), name, info)
            row[f"{name}_pct"] = math.nan if pct is None else pct
    top = [] if empty else explain(feats, info)
    row["top_features"] = "; ".join(f"{n} {'+' if pull > 0 else '-'}{abs(pull):.2f}" for n, _, pull, _ in top)
    mask_file, overlay_file = f"masks/{item.key}.png", f"overlays/{item.key}.png"
    row["mask_file"], row["overlay_file"] = mask_file, overlay_file
    if item.label is not None:
        row["label"] = item.label
    if item.truth is not None:
        row["dice"] = dice(mask, item.truth)
    lines = [f"p(malignant) {float(p_mal):.3f}   phi {'-' if empty else f'{float(phi):.3f}'}   "
             f"lesion {'none seen' if empty else f'{int(mask.sum())} px'}"]
    for n, value, pull, sign in top:
        pct = percentile(value, n, info)
        where = f"P{pct:.0f} of training lesions, " if pct is not None else ""
        # φ compares with the prior's own reference (its standardisation), not the percentiles
        lines.append(f"{n} {value:.3g} ({where}model's reference {reference(n, info):.3g}): "
                     f"pulls phi {'up' if pull > 0 else 'down'} ({'higher' if sign > 0 else 'lower'} = more suspicious)")
    write_png(out / mask_file, mask.astype(np.uint8) * 255)
    write_png(out / overlay_file, draw_overlay(grey, mask, lines))
    return row


def reference(name: str, info: ModelInfo) -> float:
    """The value of feature ``name`` at which the prior's pull is zero (mean over members)."""
    means = [float(p["mean"][name]) for p in info.description.get("priors", []) if name in p["mean"]]
    return float(np.mean(means)) if means else math.nan


def predict_items(backend: Backend, items: Sequence[Item], out: Path, batch_size: int,
                  progress: bool, errors: list[str]) -> list[dict[str, object]]:
    """Rows of predictions.csv for ``items``, in order; unreadable ones are added to ``errors``
    (one line each, also printed) and skipped."""
    from tqdm import tqdm

    info, rows = backend.info, []
    bar = tqdm(total=len(items), unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(items), batch_size):
        batch: list[tuple[Item, np.ndarray]] = []
        for item in items[start:start + batch_size]:
            try:
                grey = read_input(item.path)
                item.load_truth(grey.shape)
                batch.append((item, grey))
            except InputError as exc:
                errors.append(str(exc))
                bar.write(f"fedbus-predict: skipped {exc}", file=sys.stderr)
        if batch:
            raw = np.stack([preprocess(g, info.image_size) for _, g in batch])
            outs = backend.run(raw)
            for i, (item, grey) in enumerate(batch):
                rows.append(describe_row(item, grey, tuple(o[i] for o in outs), info, out))
        bar.update(len(items[start:start + batch_size]))
    bar.close()
    return rows


def _ci(values: np.ndarray, stat, n: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of ``stat(index array)`` over resampled images, NaN
    resamples (one class only) dropped."""
    rng = np.random.default_rng(seed)
    boot = np.array([stat(rng.integers(0, len(values), len(values))) for _ in range(n)], dtype=float)
    boot = boot[np.isfinite(boot)]
    return (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))) if boot.size else (math.nan, math.nan)


def metric_rows(rows: Sequence[dict[str, object]], n_boot: int = 1000) -> list[dict[str, object]]:
    """metrics.csv rows (metric, value, ci_low, ci_high, n): Dice over images whose truth has a
    lesion, AUC / sensitivity / specificity (decided at the model's threshold) over labelled
    images, malignant against the rest; 95 % percentile-bootstrap CIs over images."""
    out: list[dict[str, object]] = []
    d = np.array([r["dice"] for r in rows if "dice" in r], dtype=float)
    d = d[np.isfinite(d)]
    if d.size:
        lo, hi = bootstrap_ci(d, n=n_boot)
        out.append({"metric": "dice", "value": float(d.mean()), "ci_low": lo, "ci_high": hi, "n": d.size})
    labelled = [r for r in rows if "label" in r]
    if labelled:
        y = np.array([r["label"] == "malignant" for r in labelled], dtype=float)
        p = np.array([r["p_malignant"] for r in labelled], dtype=float)
        pred = np.array([r["predicted_malignant"] for r in labelled], dtype=float)
        auc = binary_auc(y, p)
        lo, hi = _ci(y, lambda i: binary_auc(y[i], p[i]), n_boot)
        out.append({"metric": "auc", "value": auc, "ci_low": lo, "ci_high": hi, "n": len(y)})
        for name, cls in (("sensitivity", 1.0), ("specificity", 0.0)):
            hit = (pred == cls)[y == cls].astype(float)
            lo, hi = bootstrap_ci(hit, n=n_boot) if hit.size else (math.nan, math.nan)
            out.append({"metric": name, "value": float(hit.mean()) if hit.size else math.nan,
                        "ci_low": lo, "ci_high": hi, "n": int(hit.size)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = Path(args.model)
    try:
        if args.export:
            if len(args.inputs) != 1:
                raise InputError("--export onnx MODEL OUT.onnx: give exactly one output file")
            return export(model, Path(args.inputs[0]))
        if args.out is None:
            raise InputError("--out DIR is required")
        if args.spacing_mm is not None and not (math.isfinite(args.spacing_mm) and args.spacing_mm > 0):
            raise InputError(f"--spacing-mm {args.spacing_mm}: give mm per pixel, a number > 0")
        if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
            raise InputError("--batch-size and --threads must be >= 1")
        backend = open_backend(model, args.device, args.threads)
    except (InputError, ValueError, OSError) as exc:  # ModelFileError and ConfigError are ValueErrors
        print(f"fedbus-predict: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    errors: list[str] = []
    items = gather([Path(p) for p in args.inputs], args.spacing_mm, errors, skip=Path(args.out))
    for e in errors:
        print(f"fedbus-predict: skipped {e}", file=sys.stderr)
    out = Path(args.out)
    rows = predict_items(backend, items, out, args.batch_size, not args.no_progress, errors)
    write_csv(out / "predictions.csv", rows)
    if any("dice" in r or "label" in r for r in rows):
        write_csv(out / "metrics.csv", metric_rows(rows, n_boot=args.bootstrap))
    print(f"{len(rows)} image(s) predicted into {out}" + (f"; {len(errors)} input(s) skipped" if errors else ""))
    return EXIT_SKIPPED if errors else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
