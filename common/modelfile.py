"""The model file: one trained model as the predict command, the simulation's ensembles and the
ONNX export read it, with everything needed to predict as it was trained.

A model file (``*.pt``) is one ``torch.save`` of the plain dict
  {"format": "fedbus-model/1", "metadata": <JSON text>, "state_dict": {name: tensor},
   "weights_sha256": hex, "metadata_sha256": hex}
read with ``weights_only=True`` (no arbitrary unpickling). The metadata (JSON, readable by any
tool) holds the resolved experiment (preprocessing size, feature set, inference choice), the
prior's effective weights and standardisation, the training lesions' feature percentiles where
the trainer held the data, the data's centres and counts (never file names), the privacy
budget spent, the malignancy ``temperature`` (``common.calibration``; a file written before it
existed loads as 1.0, uncalibrated) with how it was fitted, versions and commit. The two SHA-256
digests detect a corrupted or edited file (integrity, not authorship: whoever rewrites the file
can recompute them).

Loading a model file or an ensemble manifest for prediction is ``common.loaded_model``.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write
from common.calibration import check_temperature
from common.checkpoint import FORMAT as CHECKPOINT_FORMAT
from common.checkpoint import provenance
from common.config import ALL_FEATURES, ExperimentConfig, to_dict

FORMAT = "fedbus-model/1"
#: Percentiles of the training lesions' features kept in a model file: none below 5 or above
#: 95, so the file never holds one extreme patient's value.
PERCENTILES: tuple[int, ...] = tuple(range(5, 100, 5))
PREPROCESSING = {
    "grey": "ITU-R 601 luma of the decoded file (alpha ignored; >8 bit scaled to 0-255), /255",
    "resize": "whole frame to image_size x image_size, bilinear, antialiased (no crop or pad)",
    "normalisation": "per-image z-score over the pixels",
}


class ModelFileError(ValueError):
    """A model file or manifest that cannot be used; the message starts with the file."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prior_summary(model: nn.Module) -> dict[str, Any]:
    """The BI-RADS prior of ``model`` (``MultiTaskNet.prior``) as plain numbers: φ = sigmoid(Σ
    w·clip·tanh(((f − mean)/std)/clip) + bias), std = √(running_var + 1e-6)."""
    prior = model.prior  # type: ignore[attr-defined]
    from common.prior import CLINICAL_SIGN

    names = list(prior.names)
    std = torch.sqrt(prior.running_var + 1e-6).tolist()
    return {
        "features": names,
        "weights": prior.weights(),
        "bias": float(prior.head.bias.detach()),
        "mean": dict(zip(names, prior.running_mean.tolist())),
        "std": dict(zip(names, std)),
        "clip": float(prior.clip),
        "sign_constrained": bool(prior.sign_constrained),
        "clinical_sign": {n: CLINICAL_SIGN[n] for n in names},
    }


@torch.no_grad()
def feature_stats(images: torch.Tensor, masks: torch.Tensor, chunk: int = 32) -> dict[str, Any] | None:
    """Percentiles (``PERCENTILES``) of every BI-RADS feature over the lesions of ``images``
    (N,1,S,S) in [0,1] with their true ``masks`` (N,1,S,S); None without a lesion."""
    from common.birads import birads_features

    lesion = masks.flatten(1).amax(1) > 0
    if not bool(lesion.any()):
        return None
    imgs, msks = images[lesion].float(), masks[lesion].float()
    feats = torch.cat([birads_features(msks[i:i + chunk], imgs[i:i + chunk], names=ALL_FEATURES)
                       for i in range(0, len(imgs), chunk)]).numpy()
    q = np.percentile(feats, PERCENTILES, axis=0)  # (P, K)
    return {"n_lesions": int(len(feats)), "percentiles": list(PERCENTILES),
            "source": "true masks of the training lesions, at the model's image size",
            "quantiles": {n: [float(v) for v in q[:, k]] for k, n in enumerate(ALL_FEATURES)}}


def build_metadata(model: nn.Module, cfg: ExperimentConfig, *, name: str, description: str = "",
                   data: Mapping[str, Any] | None = None, stats: Mapping[str, Any] | None = None,
                   epsilon: float | None = None, source: Mapping[str, Any] | None = None,
                   temperature: float = 1.0, calibration: Mapping[str, Any] | None = None,
                   ) -> dict[str, Any]:
    """The metadata of a model file. ``data``: e.g. {"centres": {name: {"train": n, "val": n}}};
    ``stats``: ``feature_stats``; ``epsilon``: DP-SGD ε spent (None: no DP); ``temperature``: of
    the malignancy logit, ``calibration``: how it was fitted (``common.calibration.summary``)."""
    exp = to_dict(cfg)
    spent = None if epsilon is None or not math.isfinite(epsilon) else float(epsilon)
    return {
        "format": FORMAT, "name": name, "description": description,
        "experiment": exp,
        "preprocessing": {"image_size": cfg.data.image_size, "channels": cfg.model.in_channels,
                          **PREPROCESSING},
        "inference": exp["inference"],
        "features": list(cfg.loss.features),
        "prior": prior_summary(model),
        "feature_stats": dict(stats) if stats else None,
        "privacy": {"dp_sgd": cfg.privacy.enabled, "epsilon": spent,
                    "delta": cfg.privacy.target_delta if cfg.privacy.enabled else None},
        "data": dict(data or {}),
        "temperature": check_temperature(temperature),
        "calibration": dict(calibration) if calibration else None,
        "provenance": provenance(),
        "source": dict(source or {}),
    }


def save_model(path: str | Path, model: nn.Module, cfg: ExperimentConfig, **meta: Any) -> Path:
    """Write ``model`` (its state_dict) and ``build_metadata(model, cfg, **meta)`` atomically,
    then its model card beside it (``common.modelcard``; without evaluation until the caller
    scores the model and rewrites the card)."""
    from common.modelcard import write_card

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    metadata = json.loads(json.dumps(build_metadata(model, cfg, **meta)))  # as read back: plain JSON
    out = _write(path, state, metadata)
    write_card(out, metadata)
    return out


def _write(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    text = json.dumps(metadata, indent=1, sort_keys=True)
    payload = {"format": FORMAT, "metadata": text, "state_dict": dict(state),
               "weights_sha256": weights_sha256(state), "metadata_sha256": _sha(text)}
    return atomic_write(path, lambda fh: torch.save(payload, fh), binary=True, mode=None)


def set_temperature(path: str | Path, temperature: float, calibration: Mapping[str, Any] | None = None) -> Path:
    """Rewrite the (verified) model file at ``path`` with ``temperature`` and ``calibration``
    in its metadata, weights unchanged, then its card, keeping the card's evaluation."""
    from common.modelcard import card_paths, write_card

    state, meta = read_model(path)
    meta = {**meta, "temperature": check_temperature(temperature),
            "calibration": dict(calibration) if calibration else None}
    out = _write(path, state, meta)
    evaluation, note = None, ""
    card = card_paths(out)["json"]
    if card.is_file():
        ev = (json.loads(card.read_text(encoding="utf-8")) or {}).get("evaluation") or {}
        evaluation, note = ev.get("centres") or None, str(ev.get("note") or "")
    write_card(out, meta, evaluation, note)
    return out


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a model file after checking its format and both digests;
    ModelFileError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: many exception types
        raise ModelFileError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: a training checkpoint, not a model file (use the run's model.pt)")
    if not isinstance(fmt, str) or not fmt.startswith("fedbus-model/"):
        raise ModelFileError(f"{path}: not a fedbus model file")
    if fmt != FORMAT:
        raise ModelFileError(f"{path}: model file format {fmt!r}, this fedbus reads {FORMAT!r}; "
                             "use a fedbus version that matches the one that wrote it")
    state, text = payload.get("state_dict"), payload.get("metadata")
    if not isinstance(state, dict) or not isinstance(text, str):
        raise ModelFileError(f"{path}: model file lacks its weights or metadata")
    if weights_sha256(state) != payload.get("weights_sha256") or _sha(text) != payload.get("metadata_sha256"):
        raise ModelFileError(f"{path}: SHA-256 mismatch: the file was changed after it was written "
                             "(corrupted or tampered); refusing it")
    return state, json.loads(text)


def write_card_for(model_path: str | Path, evaluation: Sequence[Mapping[str, Any]] | None = None,
                   evaluation_note: str = "") -> dict[str, Path]:
    """Read (and verify) the model file, then ``common.modelcard.write_card`` with its metadata."""
    from common.modelcard import write_card

    _, meta = read_model(model_path)
    return write_card(model_path, meta, evaluation, evaluation_note)
