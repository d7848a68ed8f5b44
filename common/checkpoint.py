"""Checkpoints with provenance, written atomically.

A checkpoint is one ``torch.save`` file holding {"format", "state_dict", "config", "provenance",
"extra"}. It is written to a temporary file in the target folder, fsynced and renamed into
place (``common.atomic``), so a crash mid-write never leaves a truncated checkpoint under the
real name.
Loading uses ``weights_only=True`` (no arbitrary unpickling), hence ``extra`` is converted to
plain types on save (NumPy → tensors/Python numbers, paths → str, dataclasses → dicts).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common.atomic import atomic_write
from common.config import to_dict

FORMAT = "fedbus-checkpoint/1"
_REPO = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the project checkout (suffix "+dirty" with uncommitted changes); None without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(data_fingerprint: str | None = None) -> dict[str, Any]:
    """Versions (read from package metadata: flwr is never imported), git commit, UTC time."""
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "numpy": str(np.__version__),
            "monai": _version("monai"),
            "opacus": _version("opacus"),
            "flwr": _version("flwr"),
            "fedbus": _version("fedbus"),
        },
        "git_commit": _git_commit(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data_fingerprint": data_fingerprint,
    }


def _plain(value: Any) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, order="C"))  # ascontiguousarray makes 0-d arrays 1-d
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], config: Any, **extra: Any
) -> Path:
    """Write weights + resolved config + provenance atomically; returns the path.

    ``config``: an ExperimentConfig (or any config dataclass) or a plain dict. ``extra``: e.g.
    round, metrics, accountant state; ``data_fingerprint=`` is also copied into the provenance.
    """
    path = Path(path)
    cfg = to_dict(config) if dataclasses.is_dataclass(config) else _plain(dict(config or {}))
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "config": cfg,
        "provenance": provenance(extra.get("data_fingerprint")),
        "extra": _plain(extra),
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint: {"state_dict", "config", "provenance", "extra"}; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: many exception types
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    missing = [k for k in ("state_dict", "config", "provenance", "extra") if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return {k: payload[k] for k in ("state_dict", "config", "provenance", "extra")}
