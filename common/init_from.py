"""``model.init_from``: start every weight of a network from an earlier run's model.

The public → private recipe (docs/privacy.md, "A DP recipe that segments") trains a model
without DP on public centres, then fine-tunes it with DP-SGD at the private site. The file is a
``common.modelfile`` model file (``fedbus-model/1``, digests verified) or a
``common.checkpoint`` training checkpoint. The load is strict: the file must hold exactly the
network's tensors with the network's shapes (and, where the file records it, the same BI-RADS
feature set), because a partial load would silently train part of the network from scratch.
Every refusal is raised before any training and names the file.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_SHOWN = 3  # names quoted per kind of mismatch


class InitFromError(ValueError):
    """``model.init_from`` names a file this network cannot start from; the message names it."""


def read_init_state(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(state_dict, the file's BI-RADS features or None when it does not record them) of a model
    file or a training checkpoint; ``InitFromError`` naming the file otherwise."""
    from common.checkpoint import FORMAT as CHECKPOINT_FORMAT
    from common.checkpoint import load_checkpoint
    from common.modelfile import FORMAT as MODEL_FORMAT
    from common.modelfile import ModelFileError, read_model

    p = Path(path)
    where = f"model.init_from: {p}"
    if not p.is_file():
        raise InitFromError(f"{where}: no such file")
    try:
        payload: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated zip, foreign pickle, ...: many types)
        raise InitFromError(f"{where}: not a readable model file or checkpoint ({type(exc).__name__})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == CHECKPOINT_FORMAT:
        try:
            ck = load_checkpoint(p)
        except ValueError as exc:
            raise InitFromError(f"model.init_from: {exc}") from None
        return dict(ck["state_dict"]), _checkpoint_features(ck["config"])
    if isinstance(fmt, str) and fmt.startswith("fedbus-model/"):
        try:
            state, meta = read_model(p)  # format version and both digests checked
        except ModelFileError as exc:
            raise InitFromError(f"model.init_from: {exc}") from None
        feats = meta.get("features")
        return state, [str(f) for f in feats] if isinstance(feats, list) else None
    raise InitFromError(f"{where}: neither a fedbus model file ({MODEL_FORMAT}) nor a training "
                        f"checkpoint ({CHECKPOINT_FORMAT})")


def _checkpoint_features(config: Any) -> list[str] | None:
    """loss.features of a checkpoint's config (an experiment, or a run spec holding one)."""
    if not isinstance(config, Mapping):
        return None
    exp = config.get("experiment", config)
    loss = exp.get("loss") if isinstance(exp, Mapping) else None
    feats = loss.get("features") if isinstance(loss, Mapping) else None
    return [str(f) for f in feats] if isinstance(feats, (list, tuple)) else None


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``InitFromError`` unless ``state`` holds exactly ``model``'s tensors with its shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {kind}, e.g. {keys[:_SHOWN]}" for kind, keys in
                (("tensor(s) missing from the file", missing), ("tensor(s) the network lacks", unexpected),
                 ("shape mismatch(es) (file vs network)", shapes)) if keys]
    if problems:
        raise InitFromError(f"{where}: written for another network than this experiment's model "
                            f"section (arch, size, heads, features): {'; '.join(problems)}")


def initialise_from(model: nn.Module, path: str | Path, features: tuple[str, ...]) -> None:
    """Load every tensor of ``model`` from ``path`` (see the module docstring)."""
    state, file_features = read_init_state(path)
    where = f"model.init_from: {path}"
    if file_features is not None and tuple(file_features) != tuple(features):
        raise InitFromError(f"{where}: its prior combines the features {file_features}, this "
                            f"experiment's loss.features are {list(features)}")
    check_compatible(model, state, where)
    model.load_state_dict(dict(state), strict=True)
    log.info("%s: every weight loaded (%d tensors)", where, len(state))
