"""common/packing.py: one flat vector per message, exactly invertible."""
from __future__ import annotations

import numpy as np
import pytest

from common.packing import PACKED_KEY, layout_from_json, layout_of, layout_to_json, pack, unpack


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"b.weight": rng.normal(size=(3, 2)).astype(np.float32),
            "a.bias": rng.normal(size=(4,)).astype(np.float32),
            "scale": np.array(2.5, dtype=np.float32),  # 0-d stays 0-d
            "steps": np.array([7], dtype=np.int64)}  # other dtypes travel separately


def test_pack_unpack_round_trips_keys_shapes_dtypes_and_values() -> None:
    state = _state()
    flat, layout = pack(state)
    assert set(flat) == {PACKED_KEY, "steps"} and flat[PACKED_KEY].shape == (6 + 4 + 1,)
    assert [k for k, _ in layout] == ["a.bias", "b.weight", "scale"]
    back = unpack(flat, layout_from_json(layout_to_json(layout)))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_mean_of_packed_vectors_is_the_per_tensor_mean() -> None:
    a, b = _state(), {k: v * 3 for k, v in _state().items()}
    (pa, layout), (pb, _) = pack(a), pack(b)
    mean = unpack({PACKED_KEY: (pa[PACKED_KEY] + pb[PACKED_KEY]) / 2}, layout)
    np.testing.assert_allclose(mean["b.weight"], (a["b.weight"] + b["b.weight"]) / 2, rtol=1e-6)


def test_a_vector_that_does_not_fit_the_layout_is_refused() -> None:
    flat, layout = pack(_state())
    with pytest.raises(ValueError, match="11"):
        unpack({PACKED_KEY: flat[PACKED_KEY][:-1]}, layout)
    with pytest.raises(ValueError, match="both packed and separate"):
        unpack({**flat, "a.bias": np.zeros(4, np.float32)}, layout)
    assert layout_of({"x": np.zeros(2, np.float64)}) == []
    with pytest.raises(ValueError, match="malformed packing layout"):
        layout_from_json("{not json")
