"""Checks on what clients send, shared by both protocols: token ids, text, state vectors, ids, sizes.

Every check raises a ServeError naming the problem; a client's own string is never echoed whole
(errors.shown cuts it), so an error stays small whatever was sent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument, ResourceExhausted
from .repository import ModelVersion

MAX_ID_CHARS = 256  # the longest session id, sequence id or model name taken (native ids are 22 characters)


def check_id(value: str, what: str = "session id") -> str:
    """An id or name no longer than MAX_ID_CHARS (INVALID_ARGUMENT otherwise, without echoing it)."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{what} is {len(value)} characters long; at most {MAX_ID_CHARS} are accepted")
    return value


def _not_vector(mv: ModelVersion, what: str) -> None:
    """INVALID_ARGUMENT when a token call (text, token ids, generation) reaches a vector model."""
    if mv.kind == "vector":
        raise InvalidArgument(f"model {mv.key} takes frames of {mv.features} floats ({mv.meta.task} model), "
                              f"not {what}: send frames (native Feed.frames, KServe input 'inputs' FP32 [1, T, "
                              f"{mv.features}])")


def encode(mv: ModelVersion, text: str) -> np.ndarray:
    """Text -> token ids (n,); INVALID_ARGUMENT naming the first character outside the vocabulary."""
    _not_vector(mv, "text")
    ids = mv.char_ids
    try:
        return np.fromiter((ids[c] for c in text), np.int64, len(text))
    except KeyError:
        pos = next(i for i, c in enumerate(text) if c not in ids)
        raise InvalidArgument(f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} is not "
                              f"in the vocabulary of {mv.key}") from None


def check_tokens(mv: ModelVersion, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids -> (n,) int64; INVALID_ARGUMENT naming the first id outside [0, vocab)."""
    V = mv.vocab_size
    if not V:
        _not_vector(mv, "token ids")
    if type(tokens) is list and len(tokens) <= 8 and all(type(t) is int and 0 <= t < V for t in tokens):
        return np.array(tokens, np.int64)  # the common ping-pong case, without the array checks
    try:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    except (OverflowError, ValueError, TypeError):
        raise InvalidArgument(f"token ids must be integers in [0, {V}) for {mv.key}") from None
    bad = np.nonzero((arr < 0) | (arr >= V))[0]
    if len(bad):
        raise InvalidArgument(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is out of range "
                              f"[0, {V}) for {mv.key}")
    return arr


def check_frames(mv: ModelVersion, frames: Sequence[float] | np.ndarray, features: int = 0) -> np.ndarray:
    """Float frames -> (T, F) float32 for a vector model: a (T, F) array, or T*F values in time order (with
    `features` = F when given); INVALID_ARGUMENT on a token model, a wrong width, no frame, or a NaN or
    infinite value (named by frame and feature: the graphs would carry it into the state)."""
    if mv.kind != "vector":
        raise InvalidArgument(f"model {mv.key} takes token ids or text, not float frames")
    F = mv.features
    if features and features != F:
        raise InvalidArgument(f"frames have {features} features each, model {mv.key} takes {F}")
    try:
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
            arr = np.asarray(frames, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"frames must be numbers: {F} floats per frame for {mv.key}") from None
    if arr.ndim == 2 and arr.shape[1] != F:
        raise InvalidArgument(f"frames have {arr.shape[1]} features each, model {mv.key} takes {F}")
    if arr.ndim > 2 or arr.size % F:
        raise InvalidArgument(f"{arr.size} values are not whole frames of {F} features for {mv.key}")
    arr = arr.reshape(-1, F)  # (T, F)
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        t, f = (int(v) for v in bad[0])
        raise InvalidArgument(f"frame {t} feature {f} is {float(arr[t, f])}: frames must be finite numbers "
                              "(NaN or infinity would poison the session's state)")
    return arr


def check_generable(mv: ModelVersion) -> None:
    """INVALID_ARGUMENT for a generation on a vector model (it has no tokens to sample)."""
    _not_vector(mv, "a generation (a forecaster rolls out with a feed's horizon)")


def check_horizon(mv: ModelVersion, horizon: int, limit: int) -> None:
    """INVALID_ARGUMENT unless a forecast horizon fits: a forecaster, 1 <= horizon <= limit."""
    if mv.meta.task != "forecast":
        raise InvalidArgument(f"horizon is for forecasting models; {mv.key} is a {mv.meta.task} model")
    if not 1 <= horizon <= limit:
        raise InvalidArgument(f"horizon must be in [1, {limit}] (--max-feed-tokens), got {horizon}")


def check_input(mv: ModelVersion, data: Sequence | np.ndarray | str) -> np.ndarray:
    """What a feed carries, checked for its model: text or token ids -> (n,) int64, frames -> (n, F) float32."""
    if isinstance(data, str):
        return encode(mv, data)
    floats = isinstance(data, np.ndarray) and data.dtype.kind == "f"  # frames, as the protocols decode them
    if mv.kind == "vector":
        if (isinstance(data, np.ndarray) and data.dtype.kind in "iu") or (type(data) is list and data
                                                                           and type(data[0]) is int):
            _not_vector(mv, "token ids")
        return check_frames(mv, data)
    if floats:
        raise InvalidArgument(f"model {mv.key} takes token ids or text, not float frames")
    return check_tokens(mv, data)


def check_state(mv: ModelVersion, state: Sequence[float] | np.ndarray) -> np.ndarray:
    """A state vector -> (S,) float32; INVALID_ARGUMENT on a wrong length or non-finite values."""
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        arr = np.asarray(state, dtype=np.float32).reshape(-1)
    if arr.shape[0] != mv.state_size:
        raise InvalidArgument(f"state has length {arr.shape[0]}, {mv.key} needs {mv.state_size}")
    if not np.isfinite(arr).all():
        raise InvalidArgument("state contains NaN or infinite values (or values beyond float32's range)")
    return arr


def check_logits(mv: ModelVersion, logits: Sequence[float] | np.ndarray) -> np.ndarray:
    """A distribution's logits -> (V,) float32; INVALID_ARGUMENT on a wrong length or non-finite values."""
    with np.errstate(over="ignore"):
        arr = np.asarray(logits, dtype=np.float32).reshape(-1)
    if arr.shape[0] != mv.output_size:
        has = f"a vocabulary of {mv.vocab_size}" if mv.kind == "tokens" else f"{mv.output_size} outputs per step"
        raise InvalidArgument(f"logits have length {arr.shape[0]}, {mv.key} has {has}")
    if not np.isfinite(arr).all():
        raise InvalidArgument("logits contain NaN or infinite values (or values beyond float32's range)")
    return arr


def check_feed_size(n: int, limit: int) -> None:
    """RESOURCE_EXHAUSTED for a feed longer than --max-feed-tokens."""
    if n > limit:
        raise ResourceExhausted(f"a feed of {n} tokens exceeds this server's limit of {limit} tokens per "
                                "request (--max-feed-tokens): send it in parts")


def answer_bytes(steps: int, vocab: int, logits: bool, top_k: int, state: int = 0) -> int:
    """An upper estimate of an answer's size: `steps` distributions of full logits and/or top_k pairs."""
    per_step = 16 + (4 * vocab + 16 if logits else 0) + (15 * min(top_k, vocab) + 16 if top_k else 0)
    return 256 + steps * per_step + 5 * state


def check_answer_size(size: int, limit: int, what: str) -> None:
    """RESOURCE_EXHAUSTED, before any work, for an answer larger than the server may send."""
    if size > limit:
        raise ResourceExhausted(f"{what} would be about {size} bytes, over this server's message limit of "
                                f"{limit} bytes (--max-message-bytes; answers up to max(that, 64 MiB)): ask for "
                                "fewer steps (output last or none, top_k instead of logits) or feed in parts")


INITIAL_MODES = ("model", "zeros", "given")


def start_state(mv: ModelVersion, initial: str, state: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Where a session starts: the model's own initial state, zeros, or a given vector (checked)."""
    if initial == "model":
        return mv.initial_state
    if initial == "zeros":
        return np.zeros(mv.state_size, np.float32)
    if initial == "given":
        return check_state(mv, state if state is not None else [])
    raise InvalidArgument(f"initial must be one of {INITIAL_MODES}, got {initial!r}")


def check_generation(max_tokens: int, limit: int, temperature: float, top_p: float, top_k: int,
                     stop: Sequence[str]) -> None:
    """A generate request's parameters: INVALID_ARGUMENT naming the one out of range."""
    if max_tokens <= 0:
        raise InvalidArgument("max_tokens must be > 0")
    if max_tokens > limit:
        raise InvalidArgument(f"max_tokens {max_tokens} exceeds this server's limit of {limit} "
                              "(--max-generate-tokens)")
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise InvalidArgument(f"top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
    if any(not st for st in stop):
        raise InvalidArgument("stop strings must not be empty")
