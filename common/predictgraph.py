"""The prediction graph of a model file: raw images in, mask, malignancy, BI-RADS features and φ
out; run by the predict command under torch (``TorchBackend``) and exported to ONNX
(``export_onnx``) so the same graph runs under ONNX Runtime (``common.prediction.OnnxBackend``).

The network part is ``common.inference.build_predictor`` (members averaged, views of the
model's ``inference``, each member's malignancy divided by its file's ``temperature``, so the
exported graph holds the calibration as constants and predicts as torch does); the features are ``common.birads.birads_features`` of the predicted soft
mask and the raw image, and φ is each member's prior on them (averaged), as the consistency
loss sees them in training: before post-processing, which ``predict`` applies afterwards.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from common.atomic import atomic_write
from common.birads import birads_features
from common.checkpoint import provenance
from common.config import ALL_FEATURES, ConfigError
from common.data.tensors import normalise
from common.device import check_device, set_threads
from common.inference import build_predictor
from common.loaded_model import LoadedModel
from common.prediction import INPUT_NAME, META_KEY, ONNX_FORMAT, OUTPUT_NAMES, ModelInfo, Outputs

log = logging.getLogger(__name__)
OPSET = 17


class PredictGraph(nn.Module):
    """forward(raw (B,1,S,S) in [0,1]) → (mask probabilities (B,1,S,S), malignancy probabilities
    (B,), features (B,7) in ``ALL_FEATURES`` order, φ (B,))."""

    def __init__(self, predictor: nn.Module, priors: Sequence[nn.Module]) -> None:
        super().__init__()
        self.predictor = predictor
        self.priors = nn.ModuleList(priors)
        self.columns = [[ALL_FEATURES.index(n) for n in p.names] for p in priors]

    def forward(self, raw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mask_logits, cls_logits = self.predictor(normalise(raw))
        probs = torch.sigmoid(mask_logits)
        p_mal = torch.sigmoid(cls_logits.reshape(-1))
        # a full-frame row joins the batch: the roughness blur ladder then always has all its
        # levels (its length follows the batch's largest lesion), so a traced graph holds for
        # every lesion size and the numbers do not depend on the batch
        full = torch.ones_like(probs[:1])
        feats = birads_features(torch.cat([probs, full]), torch.cat([raw, raw[:1]]), names=ALL_FEATURES)[:-1]
        phi = torch.stack([prior(feats[:, cols]) for prior, cols in zip(self.priors, self.columns)]).mean(0)
        return probs, p_mal, feats, phi


def build_graph(model: LoadedModel, channels_last: bool = False) -> PredictGraph:
    """The graph of ``model``'s members with its inference views and their temperatures, in
    eval mode."""
    nets = [m.network(channels_last) for m in model.members]
    sizes = [m.config.data.image_size for m in model.members]
    predictor = build_predictor(nets, model.inference, sizes, temperatures=model.temperatures)
    return PredictGraph(predictor, [n.prior for n in nets]).eval()  # type: ignore[attr-defined]


class TorchBackend:
    """A model file (or ensemble manifest) predicted with torch."""

    def __init__(self, model: LoadedModel, device: str = "auto", threads: int | None = None) -> None:
        set_threads(threads)
        try:
            self.device = check_device(device)
        except ConfigError as exc:  # worded for training: name the command's option
            raise ConfigError(str(exc).replace("train.device", "--device")) from None
        self.graph = build_graph(model).to(self.device)
        self.info = ModelInfo(model.describe())

    def run(self, raw: np.ndarray) -> Outputs:
        with torch.inference_mode():
            out = self.graph(torch.from_numpy(np.ascontiguousarray(raw, np.float32)).to(self.device))
        return tuple(o.float().cpu().numpy() for o in out)  # type: ignore[return-value]


def export_onnx(model: LoadedModel, path: str | Path, check_images: int = 4) -> float | None:
    """Write ``model``'s graph as an ONNX file (batch size free, image side fixed) with its
    description in metadata_props[``META_KEY``]; returns the max abs difference between ONNX
    Runtime and torch over ``check_images`` random images (None without onnxruntime)."""
    import onnx

    path = Path(path)
    graph = build_graph(model)
    size = model.image_size
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(f".{path.name}.export.tmp")
    try:
        with warnings.catch_warnings():  # the tracer's notes on Python constants (fixed S)
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)})
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    desc = {"format": ONNX_FORMAT, **model.describe(), "exported": provenance()}
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(desc, sort_keys=True)
    proto.producer_name = "fedbus"
    atomic_write(path, lambda fh: fh.write(proto.SerializeToString()), binary=True, mode=None)
    return _max_diff(graph, path, check_images)


def _max_diff(graph: PredictGraph, path: Path, n: int) -> float | None:
    """Max abs difference of every output between torch and ONNX Runtime on n random images."""
    try:
        from common.prediction import OnnxBackend

        backend = OnnxBackend(path)
    except Exception as exc:  # noqa: BLE001 - no onnxruntime: the file is written all the same
        log.info("%s not checked under ONNX Runtime (%s)", path, exc)
        return None
    size = int(backend.info.image_size)
    raw = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = [o.numpy() for o in graph(raw)]
    got = backend.run(raw.numpy())
    return float(max(np.abs(a - b).max() for a, b in zip(ref, got)))
