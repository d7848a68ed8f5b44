"""Model weights as one flat float32 vector on the wire.

Flower 1.41 stores every array of a message as its own object and moves each object with its own
request (two at a time), on every hop: SuperLink → SuperNode → ClientApp and back, and again to
the ServerApp. A model of 85 tensors thus costs hundreds of round trips per round. Packing all
float32 tensors into one vector makes a message a handful of objects. Averaging, medians and
server optimisers act element-wise, so aggregating packed vectors equals aggregating per tensor.

The layout (key, shape) in sorted key order travels with the instruction as JSON; a reply packs
the same keys in the same order, so the receiver checks it against the layout it expects.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

PACKED_KEY = "__packed_f32__"
Layout = list[tuple[str, tuple[int, ...]]]


def layout_of(state: Mapping[str, np.ndarray]) -> Layout:
    """(key, shape) of the float32 arrays of ``state``, sorted by key."""
    return [(k, tuple(int(d) for d in np.shape(state[k]))) for k in sorted(state)
            if np.asarray(state[k]).dtype == np.float32]


def pack(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Layout]:
    """{PACKED_KEY: (N,) float32, other-dtype keys unchanged} and the layout of the packed part."""
    layout = layout_of(state)
    packed = {k for k, _ in layout}
    parts = [np.asarray(state[k], dtype=np.float32).reshape(-1) for k, _ in layout]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    out = {k: np.asarray(v) for k, v in state.items() if k not in packed}
    out[PACKED_KEY] = flat
    return out, layout


def unpack(arrays: Mapping[str, np.ndarray], layout: Sequence[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """Inverse of ``pack``: ``arrays`` without ``PACKED_KEY`` is returned as is. Raises
    ValueError when the vector's length or the keys do not fit ``layout``."""
    if PACKED_KEY not in arrays:
        return dict(arrays)
    flat = np.asarray(arrays[PACKED_KEY], dtype=np.float32).reshape(-1)
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    if flat.size != sum(sizes):
        raise ValueError(f"packed weights hold {flat.size} values, the layout needs {sum(sizes)}")
    out = {k: np.asarray(v) for k, v in arrays.items() if k != PACKED_KEY}
    clash = out.keys() & {k for k, _ in layout}
    if clash:
        raise ValueError(f"keys both packed and separate: {sorted(clash)[:3]}")
    offset = 0
    for (key, shape), size in zip(layout, sizes):
        out[key] = flat[offset:offset + size].reshape(tuple(shape))
        offset += size
    return out


def layout_to_json(layout: Layout) -> str:
    return json.dumps([[k, list(s)] for k, s in layout])


def layout_from_json(text: str) -> Layout:
    try:
        return [(str(k), tuple(int(d) for d in s)) for k, s in json.loads(text)]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed packing layout: {exc}") from None
