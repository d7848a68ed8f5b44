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


def check_device(name: str | None) -> torch.device:
    """``resolve_device`` that refuses a device this machine lacks (ConfigError naming
    ``train.device``), so a run fails before its folder is written, not at the first step."""
    from common.config import ConfigError

    try:
        device = resolve_device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {name!r} is not a device ({exc})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"train.device: {name!r} asked for, but this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


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
