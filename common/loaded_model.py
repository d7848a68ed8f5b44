"""A model ready to predict: one model file (``common.modelfile``) or an ensemble manifest, every
member verified, with how it predicts.

An ensemble is a YAML manifest ``{format: fedbus-ensemble/1, name, members: [relative paths],
inference: {...}}``: its members are model files, averaged by ``common.inference``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from common.atomic import atomic_write
from common.calibration import CalibrationError, check_temperature
from common.config import ConfigError, ExperimentConfig, InferenceConfig, from_dict, to_dict
from common.modelfile import ModelFileError, read_model

ENSEMBLE_FORMAT = "fedbus-ensemble/1"


@dataclass
class Member:
    """One network of a model: its weights, experiment and metadata."""

    state_dict: dict[str, torch.Tensor]
    config: ExperimentConfig
    metadata: dict[str, Any]

    @property
    def temperature(self) -> float:
        """The malignancy temperature (1.0 for a file written before calibration existed)."""
        value = self.metadata.get("temperature")
        return 1.0 if value is None else float(value)

    def network(self, channels_last: bool = False) -> nn.Module:
        """The network with its weights, in eval mode."""
        from common.model import build_model

        # the file holds every weight: neither ImageNet files nor init_from are read again
        cfg = replace(self.config.model, pretrained_path=None, init_from=None)
        model = build_model(cfg, self.config.loss.features, sign_constrained=self.config.loss.sign_constrained)
        model.load_state_dict(self.state_dict)
        if channels_last:  # as it was trained: the faster format on CPU
            model.to(memory_format=torch.channels_last)
        return model.eval()


@dataclass
class LoadedModel:
    """A model file or an ensemble manifest, verified: its members and how it predicts."""

    path: Path
    name: str
    members: list[Member]
    inference: InferenceConfig

    @property
    def image_size(self) -> int:
        """The side images are resized to (the largest member's)."""
        return max(m.config.data.image_size for m in self.members)

    @property
    def temperatures(self) -> list[float]:
        """Each member's malignancy temperature (``common.inference.build_predictor``)."""
        return [m.temperature for m in self.members]

    def describe(self) -> dict[str, Any]:
        """Plain description for predict and the ONNX file: size, inference, priors, the
        training lesions' percentiles and each member's metadata (torch-free to read)."""
        stats = next((m.metadata.get("feature_stats") for m in self.members
                      if m.metadata.get("feature_stats")), None)
        return {"name": self.name, "image_size": self.image_size, "inference": to_dict(self.inference),
                "priors": [m.metadata["prior"] for m in self.members], "feature_stats": stats,
                "temperatures": self.temperatures,
                "members": [m.metadata for m in self.members]}


def _member(path: Path) -> Member:
    state, meta = read_model(path)
    try:
        cfg = from_dict(ExperimentConfig, meta.get("experiment"), f"{path}: experiment")
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    if meta.get("temperature") is not None:
        try:
            check_temperature(meta["temperature"], f"{path}: temperature")
        except CalibrationError as exc:
            raise ModelFileError(str(exc)) from None
    return Member(state, cfg, meta)


def load_model(path: str | Path) -> LoadedModel:
    """A model file (``.pt``) or an ensemble manifest (``.yaml``/``.yml``), every member
    verified; ModelFileError naming the file otherwise."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        m = _member(path)
        return LoadedModel(path, str(m.metadata.get("name") or path.stem), [m], m.config.inference)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelFileError(f"{path}: cannot read the ensemble manifest ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT:
        raise ModelFileError(f"{path}: not a {ENSEMBLE_FORMAT} manifest")
    files = doc.get("members")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ModelFileError(f"{path}: members: expected a list of model file paths")
    members = [_member(path.parent / f) for f in files]
    try:
        inference = from_dict(InferenceConfig, doc.get("inference"), f"{path}: inference")
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    return LoadedModel(path, str(doc.get("name") or path.stem), members, inference)


def write_ensemble(path: str | Path, members: Sequence[str | Path], inference: InferenceConfig,
                   name: str = "") -> Path:
    """Write an ensemble manifest naming ``members`` relative to its folder (atomic)."""
    path = Path(path)
    rel = [Path(os.path.relpath(Path(m).resolve(), path.parent.resolve())).as_posix() for m in members]
    doc = {"format": ENSEMBLE_FORMAT, "name": name or path.stem, "members": rel,
           "inference": to_dict(inference)}
    out = atomic_write(path, lambda fh: fh.write(yaml.safe_dump(doc, sort_keys=False)), mode=None)
    from common.modelcard import write_card

    write_card(out, ensemble_metadata([read_model(m)[1] for m in members], doc))
    return out


def ensemble_metadata(metas: Sequence[Mapping[str, Any]], doc: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata standing for an ensemble in its model card: the first member's, with the
    manifest's name and inference, the members' mean prior weights and their largest ε."""
    first = metas[0]
    weights = {k: float(np.mean([m["prior"]["weights"][k] for m in metas])) for k in first["prior"]["weights"]}
    spent = [m["privacy"]["epsilon"] for m in metas if m["privacy"].get("epsilon") is not None]
    temps = [float(m.get("temperature") or 1.0) for m in metas]
    return {**first, "name": doc["name"], "inference": doc["inference"], "temperature": None,
            "calibration": {"method": "each member calibrated by its own temperature, then averaged",
                            "temperatures": temps},
            "description": (f"ensemble of {len(metas)} models ({', '.join(doc['members'])}), their outputs "
                            f"averaged; prior weights are the members' mean. {first.get('description', '')}").strip(),
            "prior": {**first["prior"], "weights": weights},
            "privacy": {**first["privacy"], "epsilon": max(spent) if spent else first["privacy"].get("epsilon")}}
