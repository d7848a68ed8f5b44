"""The mean of a federation's last global models (SWA over rounds, Izmailov et al. 2018; the
"average the last rounds" of issue #32): the model a run hands out is the element-wise mean of
the global models after rounds ``rounds − k + 1 … rounds`` instead of the last one alone.

Training is untouched (the sites always start a round from the live global model); only the
final product changes. The running sum is float64 and travels in the server checkpoint, so a
resumed run hands out the same mean as an uninterrupted one. Framework-free (no flwr).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from common.configtools import ConfigError


class TailAverage:
    """Running mean of the global state dicts of rounds ``first … rounds`` (``first`` =
    ``rounds − k + 1``); ``k`` = 1 hands out the last model unchanged and keeps no sum."""

    def __init__(self, k: int, rounds: int) -> None:
        if k < 1 or rounds < 1:
            raise ConfigError(f"federation.average_last: must be >= 1 (rounds {rounds}), got {k}")
        self.k, self.first = k, max(1, rounds - k + 1)
        self.n = 0
        self._sum: dict[str, torch.Tensor] = {}

    def add(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """Count the global model after ``server_round`` when the round lies in the window."""
        if self.k == 1 or server_round < self.first:
            return
        for key, value in state.items():
            v = value.detach().to("cpu", torch.float64)
            self._sum[key] = self._sum[key] + v if key in self._sum else v.clone()
        self.n += 1

    def result(self, last: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean (in ``last``'s dtypes; integer buffers rounded), or ``last`` itself when the
        window holds no round yet."""
        if self.n == 0:
            return dict(last)
        out = {}
        for key, value in last.items():
            mean = self._sum[key] / self.n
            out[key] = (mean.round() if not value.is_floating_point() else mean).to(value.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "n": self.n, "sum": dict(self._sum)}

    def load_state_dict(self, state: Mapping[str, Any] | None, where: str = "checkpoint") -> None:
        """Restore the sum saved with a checkpoint (None or empty: nothing counted yet). A window
        that moved since (``rounds`` changed on resume after averaging began) is refused: the
        rounds counted under the old window cannot be taken out of the sum."""
        if not state or not int(state.get("n", 0)):
            return
        first, n, total = int(state["first"]), int(state["n"]), dict(state["sum"])
        if first != self.first:
            raise ConfigError(f"{where}: federation.average_last began averaging at round {first}; "
                              f"with the new rounds it would begin at {self.first}. Change rounds "
                              "before the averaging window starts, or keep them")
        if n < 1 or not total:
            raise ConfigError(f"{where}: malformed average_last state (n {n}, {len(total)} arrays)")
        self.n, self._sum = n, {k: torch.as_tensor(v, dtype=torch.float64) for k, v in total.items()}
