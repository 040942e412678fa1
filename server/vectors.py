"""What a vector model's raw outputs mean to a client: class probabilities, or a forecast with its spread.

Shared by both protocols, so a native Distribution and a KServe output tensor say the same numbers.
"""
from __future__ import annotations

import numpy as np

from .repository import ModelVersion


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (a classifier's logits -> probabilities), float32."""
    z = outputs - outputs.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True)


def forecast_parts(mv: ModelVersion, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A forecaster's outputs (..., O) -> (mean (..., F), spread (..., F) or None): the Gaussian's mean and
    standard deviation exp(0.5 * log_var) when the model predicts a variance."""
    F = mv.features
    mean = outputs[..., :F]
    if "log_var" not in mv.meta.forecast_outputs:
        return mean, None
    return mean, np.exp(0.5 * outputs[..., F:2 * F], dtype=np.float32)


def named_outputs(mv: ModelVersion) -> tuple[str, ...]:
    """The answers a vector model gives, by name: `probabilities`, or `mean` (and `spread`)."""
    if mv.meta.task == "classify":
        return ("probabilities",)
    return ("mean", "spread") if "log_var" in mv.meta.forecast_outputs else ("mean",)


def answer(mv: ModelVersion, outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Raw outputs (..., O) -> {name: array} per named_outputs."""
    if mv.meta.task == "classify":
        return {"probabilities": probabilities(outputs)}
    mean, spread = forecast_parts(mv, outputs)
    return {"mean": mean} if spread is None else {"mean": mean, "spread": spread}
