"""Score the mean of several trained runs of ``benchmarks/external_validation.py`` as one model.

Runs of the same arm that differ only in ``--seed`` can train side by side, one per core; their
mean prediction (mask and malignancy probabilities averaged, then thresholded as for one model)
is scored on the external centres with the same code as a single run, and written in the same
files (metrics.csv, per_image.csv), so ``benchmarks.pair_runs`` compares it with any other run:

    python -m benchmarks.ensemble runs/D1 runs/D1s1 --out runs/D1x2 --postprocess

Members trained at different image sizes are scored together at the largest of them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.external_validation import (
    DEFAULT_CACHE, TRAIN_CENTRE, cache_dir_of, default_data_root, load_external, parse_shifts, score,
)
from common.config import ExperimentConfig, from_dict
from common.data import discover_centres
from common.device import set_threads
from common.model import build_model


class MeanOfModels(nn.Module):
    """(mask logits (B,1,H,W), malignancy logits (B,)) of the mean of the members' probabilities:
    averaging probabilities, not logits, keeps one over-confident member from deciding alone.

    ``sizes`` (one per member, optional): a member trained at another image size gets x resized
    to its size (bilinear, antialiased) and its mask probabilities resized back to (H, W)."""

    def __init__(self, members: list[nn.Module], sizes: list[int] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if sizes is not None and len(sizes) != len(members):
            raise ValueError(f"MeanOfModels: {len(sizes)} sizes for {len(members)} members")
        self.sizes = sizes

    def _member(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        hw = tuple(x.shape[-2:])
        s = self.sizes[i] if self.sizes is not None else None
        if s is None or (s, s) == hw:
            m, c = self.members[i](x)
            return torch.sigmoid(m), torch.sigmoid(c)
        m, c = self.members[i](F.interpolate(x, size=(s, s), mode="bilinear", antialias=True,
                                             align_corners=False))
        back = F.interpolate(torch.sigmoid(m), size=hw, mode="bilinear", align_corners=False)
        return back, torch.sigmoid(c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outs = [self._member(i, x) for i in range(len(self.members))]
        mask = torch.stack([o[0] for o in outs]).mean(0)
        cls = torch.stack([o[1] for o in outs]).mean(0)
        return torch.logit(mask, eps=1e-6), torch.logit(cls, eps=1e-6)


def load_member(run: Path) -> tuple[str, int, ExperimentConfig, nn.Module]:
    """(arm, image size, config, model with the saved weights) of a run folder holding one arm."""
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (a run folder of benchmarks/external_validation.py?)")
    saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    if len(saved["arms"]) != 1:
        raise ValueError(f"{cfg_path}: holds arms {list(saved['arms'])}; give runs of one arm each")
    (arm, cfg_dict), = saved["arms"].items()
    cfg = from_dict(ExperimentConfig, cfg_dict, str(cfg_path))
    model = build_model(cfg.model, cfg.loss.features, sign_constrained=cfg.loss.sign_constrained)
    weights = run / f"model_{arm}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (the run did not finish?)")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return arm, int(saved["args"]["size"]), cfg, model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+",
                   help="run folders of one arm each, the same arm; of different image sizes, the "
                        "ensemble is scored at the largest (smaller members see a resized image)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--postprocess", action="store_true", help="also score flip TTA + largest component")
    p.add_argument("--depth-tta", type=parse_shifts, default=(),
                   help="also score depth-shift TTA with these upward shifts, e.g. 0.15,0.3")
    p.add_argument("--channels-last", action="store_true",
                   help="members in channels-last memory format (faster on CPU, same predictions "
                        "to float rounding)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    try:
        members = [load_member(r) for r in args.runs]
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if len({arm for arm, *_ in members}) != 1:
        print(f"runs differ in arm: {[a for a, *_ in members]}", file=sys.stderr)
        return 2
    arm, _, cfg, _ = members[0]
    size = max(s for _, s, _, _ in members)
    net = MeanOfModels([m for *_, m in members], [s for _, s, _, _ in members]).eval()
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    centres = discover_centres(args.data_root)
    t0 = time.perf_counter()
    scored = {c: load_external(c, root, size, cache_dir_of(args.cache_dir))
              for c, root in centres.items() if c != TRAIN_CENTRE}
    rows, per_image = score(net, scored, args.postprocess, cfg.train.device, 0,
                            arm=arm, depth_tta=args.depth_tta, members=len(members))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "members.txt").write_text("\n".join(str(r.resolve()) for r in args.runs) + "\n")
    table = pd.DataFrame(rows).astype({"n_images": int, "n_lesion": int})
    table.to_csv(args.out / "metrics.csv", index=False)
    pd.concat(per_image, ignore_index=True).to_csv(args.out / "per_image.csv", index=False)
    print(table[["arm", "inference", "centre", "members", "n_lesion", "dice", "dice_ci_lo", "dice_ci_hi",
                 "auc"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
