"""What the predict command needs apart from the network, torch-free (NumPy, SciPy, Pillow and,
for ``.onnx`` files, ONNX Runtime), so a workstation with only those predicts from an export.

* ``read_input`` decodes one input file safely (regular files only, decompression bombs refused);
* ``preprocess`` makes the model input as ``to_tensors`` does (whole frame, bilinear, antialiased);
* ``ModelInfo`` reads a model's description (``common.loaded_model.LoadedModel.describe``, also
  stored in an ONNX file's metadata): size, inference choice, priors, training percentiles;
* ``explain`` ranks the BI-RADS features by their pull on φ; ``percentile`` places a value
  among the training lesions;
* ``OnnxBackend`` runs an exported graph (``common.predictgraph``) with ONNX Runtime.
Every backend maps raw images (B,1,S,S) in [0,1] to (mask probabilities (B,1,S,S), malignancy
probabilities (B,), features (B,7) in ``ALL_FEATURES`` order, φ (B,)).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import numpy as np
from PIL import Image

from common.config import ALL_FEATURES
from common.data.io import FileError, read_grey
from common.postprocess import resize_float

ONNX_FORMAT = "fedbus-onnx/1"
META_KEY = "fedbus"  # key of the description in an ONNX file's metadata_props
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("mask", "p_malignant", "features", "phi")
Outputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
T = TypeVar("T")


class InputError(ValueError):
    """An input that cannot be predicted; the message starts with the file."""


def read_input(path: str | Path, reader: Callable[[Path], T] = read_grey) -> T:  # type: ignore[assignment]
    """``reader(path)`` (default: uint8 (H,W) grey of an image file); InputError naming the file
    for a missing, non-regular, undecodable or truncated file, or one whose pixel count Pillow
    treats as a decompression bomb."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():  # a FIFO or device would block or stream forever
        raise InputError(f"{p}: not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return reader(p)
        except FileError as exc:
            raise InputError(str(exc)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{p}: refused, too many pixels ({exc})") from None
        except (OSError, ValueError, MemoryError) as exc:
            raise InputError(f"{p}: cannot decode image ({type(exc).__name__})") from None


def preprocess(grey: np.ndarray, size: int) -> np.ndarray:
    """float32 (1,size,size) in [0,1] of a uint8 (H,W) image: the model's raw input."""
    img = resize_float(grey.astype(np.float32) / 255.0, size, size)
    return np.clip(img, 0.0, 1.0)[None]


@dataclass(frozen=True)
class ModelInfo:
    """A model's description (``LoadedModel.describe``), read without torch."""

    description: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.description.get("name", ""))

    @property
    def image_size(self) -> int:
        return int(self.description["image_size"])

    @property
    def inference(self) -> dict[str, Any]:
        return dict(self.description["inference"])

    @property
    def threshold(self) -> float:
        return float(self.inference.get("threshold", 0.5))

    @property
    def feature_stats(self) -> dict[str, Any] | None:
        return self.description.get("feature_stats") or None


def explain(features: np.ndarray, info: ModelInfo, top: int = 3) -> list[tuple[str, float, float, int]]:
    """(feature, value, pull, clinical sign) of the ``top`` features with the largest |pull| on
    logit(φ): pull = w·clip·tanh(((f − mean)/std)/clip), averaged over the members' priors
    (> 0: towards malignant). ``features`` (7,) in ``ALL_FEATURES`` order."""
    pulls: dict[str, list[float]] = {}
    signs: dict[str, int] = {}
    for prior in info.description.get("priors", []):
        clip = float(prior["clip"])
        for name in prior["features"]:
            value = float(features[ALL_FEATURES.index(name)])
            z = (value - prior["mean"][name]) / prior["std"][name]
            pulls.setdefault(name, []).append(prior["weights"][name] * clip * math.tanh(z / clip))
            signs[name] = int(prior["clinical_sign"][name])
    ranked = sorted(pulls, key=lambda n: -abs(float(np.mean(pulls[n]))))[:top]
    return [(n, float(features[ALL_FEATURES.index(n)]), float(np.mean(pulls[n])), signs[n]) for n in ranked]


def percentile(value: float, name: str, info: ModelInfo) -> float | None:
    """Where ``value`` of feature ``name`` lies among the training lesions (0-100, interpolated
    between the stored percentiles, clamped to the first and last); None without statistics."""
    stats = info.feature_stats
    if not stats or name not in stats.get("quantiles", {}):
        return None
    q = np.asarray(stats["quantiles"][name], dtype=float)
    pct = np.asarray(stats["percentiles"], dtype=float)
    if not np.isfinite(value):
        return None
    q_unique, first = np.unique(q, return_index=True)  # ties: the lowest percentile of the tie
    return float(np.interp(value, q_unique, pct[first]))


class Backend(Protocol):
    """What the predict command runs."""

    info: ModelInfo

    def run(self, raw: np.ndarray) -> Outputs: ...


class OnnxBackend:
    """An exported ``.onnx`` file under ONNX Runtime: no torch needed."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(f"{path}: running an .onnx model needs onnxruntime "
                             "(pip install 'fedbus[export]')") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError(f"--device {device}: this ONNX Runtime has no CUDA provider "
                                 "(onnxruntime-gpu); use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for a bad file
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        text = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if not text:
            raise InputError(f"{path}: an ONNX file without fedbus metadata (export it with "
                             "fedbus-predict --export onnx)")
        desc = json.loads(text)
        if desc.get("format") != ONNX_FORMAT:
            raise InputError(f"{path}: ONNX export format {desc.get('format')!r}, this fedbus reads "
                             f"{ONNX_FORMAT!r}")
        self.info = ModelInfo(desc)

    def run(self, raw: np.ndarray) -> Outputs:
        out = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(raw, np.float32)})
        return tuple(np.asarray(o, dtype=np.float32) for o in out)  # type: ignore[return-value]
