"""Device, seeding and thread settings shared by training, evaluation and benchmarks."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto" picks CUDA when present (so the same code runs on a GPU), else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int | None) -> None:
    """Set intra-op threads (None: leave torch's default, i.e. all cores)."""
    if n is not None and n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
