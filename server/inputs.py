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


def encode(mv: ModelVersion, text: str) -> np.ndarray:
    """Text -> token ids (n,); INVALID_ARGUMENT naming the first character outside the vocabulary."""
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
    if arr.shape[0] != mv.vocab_size:
        raise InvalidArgument(f"logits have length {arr.shape[0]}, {mv.key} has a vocabulary of {mv.vocab_size}")
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
