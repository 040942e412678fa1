"""Vector models on the client: frames in (a (T, F) array or a list of lists), a FrameResult out.

A vector model (ModelInfo.input_kind "vector") takes frames of F floats in raw units (the model normalises
them) and answers per step either a classifier's class probabilities or a forecaster's next frame (mean and,
when the model predicts a variance, spread); `horizon` H adds an H-step rollout after the frames, computed
without moving the session. The server checks widths, NaN and infinity and names the problem
(INVALID_ARGUMENT); this module only turns Python data into a Feed and a FeedResult into arrays.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..v1 import rnnserve_pb2 as pb
from .core import Call, output_mode

log = logging.getLogger(__name__)

Frames = np.ndarray | Sequence[Sequence[float]] | Sequence[float]
"""T frames of F floats: a (T, F) array or list of lists; a flat (F,) array or list is one frame."""


def as_frames(data: Frames) -> np.ndarray:
    """`data` as float32 (T, F); ValueError naming the frame and value that cannot be one."""
    try:
        x = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        x = None
    if x is None or x.dtype == object:
        _explain(data)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"frames: expected a (T, F) array or one (F,) frame, got shape {x.shape}")
    return x


def _explain(data: Frames) -> None:
    """Raise a ValueError naming the frame (and value) of `data` that makes it no (T, F) array of numbers."""
    rows = data.tolist() if isinstance(data, np.ndarray) else list(data)
    if rows and np.ndim(rows[0]) == 0 and not isinstance(rows[0], (str, bytes)):
        rows = [rows]  # one flat frame
    width = None
    for t, row in enumerate(rows):
        values = row if isinstance(row, (list, tuple, np.ndarray)) else None
        if values is None:
            raise ValueError(f"frames: frame {t} is {type(row).__name__}, not a sequence of floats")
        if width is not None and len(values) != width:
            raise ValueError(f"frames: frame {t} has {len(values)} values, frame 0 has {width} (ragged)")
        width = len(values)
        for f, v in enumerate(values):
            try:
                float(v)
            except (TypeError, ValueError):
                raise ValueError(f"frames: frame {t} value {f} is not a number: {v!r}") from None
    raise ValueError("frames: not a (T, F) array of numbers")


def feed_message(frames: Frames, output: str | int = "last", horizon: int = 0,
                 logits: bool = False) -> pb.Feed:
    """A Feed of frames (T, F), asking for `output` ("none", "last", "all") and a forecaster's `horizon`."""
    x = as_frames(frames)
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
        raise ValueError(f"horizon must be an integer >= 0 (0 = no rollout), got {horizon!r}")
    return pb.Feed(frames=pb.Frames(values=x.reshape(-1).tolist(), features=x.shape[1]),
                   output=output_mode(output), logits=logits, horizon=horizon)


class Forecast(NamedTuple):
    """A forecaster's rollout after the frames: mean (H, F) and spread (H, F), None without a variance."""

    mean: np.ndarray
    spread: np.ndarray | None


def _stack(dists: Sequence[pb.Distribution], field: str) -> np.ndarray | None:
    """One field of every Distribution as a (n, k) float32 array; None when none of them has it."""
    rows = [list(getattr(d, field)) for d in dists]
    if not rows or not any(rows):
        return None
    return np.asarray(rows, np.float32)


@dataclass(frozen=True)
class FrameResult:
    """What a feed of frames answered. `probs`, `mean`, `spread` and `outputs` are the last answered step's
    (None when the model does not give them, or with output "none"); the `*_all` arrays hold every
    answered step (one row with output "last", T with "all")."""

    fed: int  # frames this feed consumed
    steps: int  # frames the session has consumed so far
    classes: tuple[str, ...]  # a classifier's class names, in `probs` order (ModelInfo.classes)
    probs_all: np.ndarray | None  # (n, C) class probabilities per answered step
    mean_all: np.ndarray | None  # (n, F) a forecaster's prediction of the next frame
    spread_all: np.ndarray | None  # (n, F) its standard deviation
    outputs_all: np.ndarray | None  # (n, O) the raw outputs, when asked for with logits=True
    forecast: Forecast | None  # the rollout of Feed.horizon steps, None without one

    probs = property(lambda self: None if self.probs_all is None else self.probs_all[-1],
                     doc="(C,) class probabilities at the last answered step.")
    mean = property(lambda self: None if self.mean_all is None else self.mean_all[-1],
                    doc="(F,) the forecast of the next frame after the last answered step.")
    spread = property(lambda self: None if self.spread_all is None else self.spread_all[-1],
                      doc="(F,) the standard deviation of that forecast (None without a variance).")
    outputs = property(lambda self: None if self.outputs_all is None else self.outputs_all[-1],
                       doc="(O,) the raw outputs at the last answered step (logits=True).")

    @property
    def index(self) -> int | None:
        """The most probable class's index at the last answered step (classifiers)."""
        return None if self.probs_all is None else int(np.argmax(self.probs_all[-1]))

    @property
    def label(self) -> str | None:
        """The predicted class name at the last answered step (None when the class names are unknown: a
        unary step_frames without `model`; `index` has the class's index)."""
        i = self.index
        return self.classes[i] if i is not None and i < len(self.classes) else None

    @property
    def prob(self) -> float | None:
        """The predicted class's probability at the last answered step."""
        i = self.index
        return None if i is None else float(self.probs_all[-1, i])


def frame_result(fed: pb.FeedResult, model: pb.ModelInfo | None = None) -> FrameResult:
    """A FeedResult of a vector model as arrays; `model` (the session's ModelInfo) names the classes."""
    forecast = None
    if len(fed.forecast):
        mean = _stack(fed.forecast, "mean")
        forecast = Forecast(mean if mean is not None else np.zeros((len(fed.forecast), 0), np.float32),
                            _stack(fed.forecast, "spread"))
    d = fed.distributions
    classes = tuple(model.classes) if model is not None else ()
    return FrameResult(fed.fed, fed.steps, classes, _stack(d, "probs"), _stack(d, "mean"),
                       _stack(d, "spread"), _stack(d, "logits"), forecast)


def describe(r: FrameResult, digits: int = 4) -> str:
    """A one-line running answer: `class NAME p=0.973`, or `next mean [...] spread [...]`."""
    if r.probs_all is not None:
        return f"class {r.label if r.label is not None else r.index} p={r.prob:.3f}"
    if r.mean_all is None:
        return f"{r.steps} frames"
    out = f"next mean {vector_text(r.mean, digits)}"
    return out + (f" spread {vector_text(r.spread, digits)}" if r.spread is not None else "")


def vector_text(v: Any, digits: int = 4) -> str:
    """A short float vector as `[1.23 -0.0456 ...]` (`digits` significant digits)."""
    return "[" + " ".join(f"{float(x):.{digits}g}" if math.isfinite(float(x)) else str(float(x))
                          for x in np.ravel(v)) + "]"


def step(session_id: str, data: Frames, horizon: int = 0, output: str | int = "last", logits: bool = False,
         model: pb.ModelInfo | None = None) -> Call:
    """Step with frames: returns the FrameResult."""
    req = pb.StepRequest(session_id=session_id, feed=feed_message(data, output, horizon, logits))
    return Call("Step", req, lambda r: frame_result(r.result, model), session_id)
