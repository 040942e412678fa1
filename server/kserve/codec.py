"""Tensor and parameter codecs of the Open Inference Protocol, for rnnserve's one-input models.

Requests carry `tokens` (INT64, [1, T]) either as little-endian `raw_input_contents` or as
typed `contents.int64_contents`; responses carry FP32 `logits` [1, T, vocab] (and `state`
[1, state_size] when asked for) as `raw_output_contents`, which tritonclient's as_numpy reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgument, shown
from ..inputs import check_id

INPUT = "tokens"
OUTPUTS = ("logits", "state")
DEFAULT_OUTPUTS = ("logits",)  # `state` only when requested


def invalid(message: str) -> InvalidArgument:
    """An INVALID_ARGUMENT error."""
    return InvalidArgument(message)


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence parameters of one request; id None = stateless."""

    id: int | str | None
    start: bool
    end: bool


def _param(p: Any) -> Any:
    """The Python value of one InferParameter (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def read_sequence(request: Any) -> Sequence:
    """Triton's `sequence_id` (int64 or string), `sequence_start`, `sequence_end` of a request."""
    params = request.parameters
    if not params:
        return Sequence(None, False, False)
    seq_id = _param(params["sequence_id"]) if "sequence_id" in params else None
    if isinstance(seq_id, (bool, float)):
        raise invalid(f"parameter sequence_id must be an int64 or a string, got {seq_id!r}")
    if isinstance(seq_id, str):
        check_id(seq_id, "parameter sequence_id")
    flags = {}
    for key in ("sequence_start", "sequence_end"):
        value = _param(params[key]) if key in params else False
        if not isinstance(value, (bool, int)):
            raise invalid(f"parameter {key} must be a bool, got {shown(value)}")
        flags[key] = bool(value)
    if seq_id in (None, 0, ""):
        if flags["sequence_start"] or flags["sequence_end"]:
            raise invalid("sequence_start/sequence_end given without a sequence_id "
                          "(a request without a sequence id is stateless)")
        return Sequence(None, False, False)
    return Sequence(seq_id, flags["sequence_start"], flags["sequence_end"])


def read_tokens(request: Any) -> np.ndarray:
    """The `tokens` input of a request as an int64 vector (T,); the ids are checked by the engine."""
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        raise invalid(f"expected exactly one input named {INPUT!r} (INT64, shape [1, T]), got {names}")
    tensor = inputs[0]
    shape = list(tensor.shape)
    if len(shape) != 2:
        raise invalid(f"input {INPUT!r} must have shape [1, T], got {shape}")
    if shape[0] != 1:
        raise invalid(f"input {INPUT!r} has batch dimension {shape[0]}; this server takes batch 1 "
                      "per request (send one request per sequence; the server batches across them)")
    count = shape[1]
    if count < 1:
        raise invalid(f"input {INPUT!r} must hold at least one token, got shape {shape}")
    dtype = tensor.datatype
    if dtype not in ("INT64", "INT32"):
        raise invalid(f"input {INPUT!r} must be INT64 (or INT32), got {dtype or 'no datatype'}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise invalid(f"raw_input_contents holds {len(raw)} tensors for 1 input")
        width = 8 if dtype == "INT64" else 4
        data = raw[0]
        if len(data) != count * width:
            raise invalid(f"input {INPUT!r}: raw_input_contents has {len(data)} bytes, "
                          f"shape {shape} of {dtype} needs {count * width}")
        tokens = np.frombuffer(data, dtype="<i8" if width == 8 else "<i4").astype(np.int64)
    else:
        contents = tensor.contents
        values = contents.int64_contents if dtype == "INT64" else contents.int_contents
        if len(values) != count:
            field = "int64_contents" if dtype == "INT64" else "int_contents"
            raise invalid(f"input {INPUT!r}: contents.{field} has {len(values)} values, "
                          f"shape {shape} needs {count}")
        tokens = np.fromiter(values, dtype=np.int64, count=count)
    return tokens  # (T,)


def requested_outputs(request: Any) -> tuple[str, ...]:
    """Names of the outputs a request asks for (`logits` alone when it names none)."""
    if not request.outputs:
        return DEFAULT_OUTPUTS
    names = tuple(o.name for o in request.outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise invalid(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return names


def fill_response(response: Any, names: tuple[str, ...], logits: np.ndarray,
                  state: np.ndarray | None) -> None:
    """Append the asked outputs to response as FP32 raw_output_contents (little-endian)."""
    for name in names:
        if name == "logits":
            data = logits  # (T, V)
            shape = (1, *logits.shape)
        else:
            assert state is not None, "the state output was asked for but not computed"
            data = state  # (S,)
            shape = (1, state.shape[0])
        out = response.outputs.add()
        out.name = name
        out.datatype = "FP32"
        out.shape.extend(shape)
        response.raw_output_contents.append(np.ascontiguousarray(data, dtype="<f4").tobytes())
