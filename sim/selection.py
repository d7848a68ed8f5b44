"""Which epoch's weights a centralised unit keeps: the best validation score, or the last.

The score is the mean of the validation Dice (lesion images) and AUC, over whichever of the two
is finite (Dice alone for an arm without a classification loss, whose head is untrained, or a
one-class validation split); ties go to the later epoch. The validation split is never trained on, so choosing on it leaks
nothing of the training images (under DP the selection is post-processing of iterates that the
guarantee already covers).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import pandas as pd
import torch

from common.settings import SELECTIONS


def selection_score(summary: Mapping[str, float], classify: bool = True) -> float:
    """Mean of the finite ones of validation Dice and (when ``classify``) AUC; -inf if neither.

    An epoch whose validation Dice is 0 (no lesion found anywhere) scores 0 whatever its AUC:
    otherwise a good AUC let an empty-mask epoch win (seen: a pooled unit on real data kept one)."""
    dice = summary.get("dice", math.nan)
    if dice is not None and dice == 0:
        return 0.0
    values = [dice] + ([summary.get("auc", math.nan)] if classify else [])
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else -math.inf


class EpochSelector:
    """Feed it every epoch (``update``); ``restore`` loads the selected epoch's weights.

    ``rule``: "best_val" (keep a copy of the weights whenever the score is >= the best so far)
    or "last" (nothing copied; the model already holds the last epoch)."""

    def __init__(self, rule: str = "best_val", classify: bool = True) -> None:
        if rule not in SELECTIONS:
            raise ValueError(f"selection rule {rule!r} not one of {SELECTIONS}")
        self.rule, self.classify = rule, classify
        self.best_epoch, self.best_score = 0, -math.inf
        self._state: dict[str, torch.Tensor] | None = None
        self._rows: list[dict[str, Any]] = []

    def update(self, epoch: int, loss: float, summary: Mapping[str, float], model: torch.nn.Module) -> bool:
        """Record one epoch; returns True when it is now the selected one."""
        s = selection_score(summary, self.classify)
        self._rows.append({"step": int(epoch), "step_kind": "epoch", "loss": float(loss),
                           "val_dice": float(summary.get("dice", math.nan)),
                           "val_auc": float(summary.get("auc", math.nan)), "val_score": s})
        if self.rule == "last":
            self.best_epoch, self.best_score = int(epoch), s
            return True
        if s >= self.best_score:
            self.best_epoch, self.best_score = int(epoch), s
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        return False

    def restore(self, model: torch.nn.Module) -> int:
        """Load the selected weights into ``model`` (no-op for "last"); returns the epoch."""
        if self.rule == "best_val" and self._state is not None:
            model.load_state_dict(copy.deepcopy(self._state))
        return self.best_epoch

    def curves(self) -> pd.DataFrame:
        """One row per epoch (step, step_kind, loss, val_dice, val_auc, val_score, selected)."""
        df = pd.DataFrame(self._rows, columns=["step", "step_kind", "loss", "val_dice", "val_auc", "val_score"])
        return df.assign(selected=df["step"] == self.best_epoch)
