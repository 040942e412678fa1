"""The batcher's guard against NaN and infinity: which rows of a step's outputs may be written back.

A row whose logits or state hold NaN or infinity is not written: its session keeps its state and its request
gets FAILED_PRECONDITION naming the model; the rest of the batch carries on. Logged once per version and
counted in rnnserve_nonfinite_rows.
"""
from __future__ import annotations

import logging
from math import isfinite

import numpy as np

from .errors import FailedPrecondition
from .repository import ModelVersion
from .sessions import Session

log = logging.getLogger(__name__)
_sum = np.add.reduce  # ndarray.sum without its Python wrapper: a few us per call on the per-step path


def all_finite(logits: np.ndarray, state: np.ndarray) -> bool:
    """Whether every value is finite: NaN and infinity carry into a sum (one reduction each, no mask)."""
    return isfinite(_sum(logits, None)) and isfinite(_sum(state, None))


class FiniteGuard:
    """Finds the non-finite rows of one model version's outputs and words the error their sessions get."""

    def __init__(self, model: ModelVersion, metrics=None) -> None:
        self.model, self.metrics = model, metrics
        self._seen = False

    def rows(self, logits: np.ndarray, state: np.ndarray) -> np.ndarray:
        """(rows,) True where a row's logits or state hold NaN or infinity; logged once per version."""
        if all_finite(logits, state):
            return np.zeros(len(logits), bool)
        bad = ~(np.isfinite(logits.reshape(len(logits), -1)).all(1) & np.isfinite(state).all(1))
        if bad.any():
            if self.metrics is not None:
                self.metrics.nonfinite(self.model, int(bad.sum()))
            if not self._seen:
                self._seen = True
                log.error("%s produced NaN or infinite values for %d row(s) of a batch; those sessions keep "
                          "their state from before the step and get FAILED_PRECONDITION (logged once per version, "
                          "counted in rnnserve_nonfinite_rows)", self.model.key, int(bad.sum()))
        return bad

    def error(self, session: Session) -> FailedPrecondition:
        """The error of a session whose step gave non-finite values."""
        return FailedPrecondition(f"model {self.model.key} produced NaN or infinite values for session "
                                  f"{session.id}; the session keeps its state from before this request (its "
                                  "state, or the model, does not give finite outputs)")
