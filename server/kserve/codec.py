"""Tensor and parameter codecs of the Open Inference Protocol, for rnnserve's one-input models.

Requests carry `tokens` (INT64, [1, T]) either as little-endian `raw_input_contents` or as
typed `contents.int64_contents`; responses carry FP32 `logits` [1, T, vocab] (and `state`
[1, state_size] when asked for) as `raw_output_contents`, which tritonclient's as_numpy reads.
Every request goes through here, so the common case (one token, raw INT64, Triton's sequence
parameters) takes the fewest message accesses; the checks and their messages are the same on every path.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import vectors
from ..errors import InvalidArgument, shown
from ..inputs import check_id

INPUT = "tokens"
VECTOR_INPUT = "inputs"  # a vector model's frames, FP32 [1, T, F]
HORIZON = "horizon"  # request parameter: a forecaster's steps to roll out after the frames
OUTPUTS = ("logits", "state")
VECTOR_OUTPUTS = ("outputs", "probabilities", "mean", "spread", "forecast_mean", "forecast_spread")
DEFAULT_OUTPUTS = ("logits",)  # `state` only when requested
SHORT = 8  # inputs up to this many tokens are read as a list (the engine checks a short list fastest)
_WIDTH = {"INT64": 8, "INT32": 4}
_UNPACK = {(dtype, n): struct.Struct(f"<{n}{code}").unpack
           for dtype, code in (("INT64", "q"), ("INT32", "i")) for n in range(1, SHORT + 1)}


def invalid(message: str) -> InvalidArgument:
    """An INVALID_ARGUMENT error."""
    return InvalidArgument(message)


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence parameters of one request; id None = stateless."""

    id: int | str | None
    start: bool
    end: bool


STATELESS = Sequence(None, False, False)


def _param(p: Any) -> Any:
    """The Python value of one InferParameter (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _flag(params: Any, key: str) -> bool:
    """A bool parameter (an int is taken as one), False when absent."""
    if key not in params:
        return False
    value = _param(params[key])
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, int)):
        raise invalid(f"parameter {key} must be a bool, got {shown(value)}")
    return bool(value)


def read_sequence(request: Any) -> Sequence:
    """Triton's `sequence_id` (int64 or string), `sequence_start`, `sequence_end` of a request."""
    params = request.parameters
    if not params:
        return STATELESS
    seq_id = _param(params["sequence_id"]) if "sequence_id" in params else None
    if type(seq_id) is not int:
        if isinstance(seq_id, (bool, float)):
            raise invalid(f"parameter sequence_id must be an int64 or a string, got {seq_id!r}")
        if isinstance(seq_id, str):
            check_id(seq_id, "parameter sequence_id")
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    if seq_id is None or seq_id == 0 or seq_id == "":
        if start or end:
            raise invalid("sequence_start/sequence_end given without a sequence_id "
                          "(a request without a sequence id is stateless)")
        return STATELESS
    return Sequence(seq_id, start, end)


def read_tokens(request: Any) -> list[int] | np.ndarray:
    """The `tokens` input of a request as T ids: a list up to SHORT tokens (the ping-pong case), else an int64
    vector (T,); the ids are checked by the engine."""
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
    width = _WIDTH.get(dtype)
    if width is None:
        raise invalid(f"input {INPUT!r} must be INT64 (or INT32), got {dtype or 'no datatype'}")
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise invalid(f"raw_input_contents holds {len(raw)} tensors for 1 input")
        data = raw[0]
        if len(data) != count * width:
            raise invalid(f"input {INPUT!r}: raw_input_contents has {len(data)} bytes, "
                          f"shape {shape} of {dtype} needs {count * width}")
        if count <= SHORT:
            return list(_UNPACK[dtype, count](data))
        return np.frombuffer(data, dtype="<i8" if width == 8 else "<i4").astype(np.int64)
    contents = tensor.contents
    values = contents.int64_contents if width == 8 else contents.int_contents
    if len(values) != count:
        field = "int64_contents" if width == 8 else "int_contents"
        raise invalid(f"input {INPUT!r}: contents.{field} has {len(values)} values, "
                      f"shape {shape} needs {count}")
    if count <= SHORT:
        return list(values)
    return np.fromiter(values, dtype=np.int64, count=count)


def requested_outputs(request: Any) -> tuple[str, ...]:
    """Names of the outputs a request asks for (`logits` alone when it names none; a vector model's defaults
    are chosen by model_outputs once the model is known)."""
    if not request.outputs:
        return DEFAULT_OUTPUTS
    names = tuple(o.name for o in request.outputs)
    unknown = [n for n in names if n not in OUTPUTS + VECTOR_OUTPUTS]
    if unknown:
        raise invalid(f"unknown output(s) {unknown}; token models have {list(OUTPUTS)}, vector models "
                      f"{list(VECTOR_OUTPUTS)}")
    return names


def read_horizon(request: Any) -> int:
    """The `horizon` parameter (a forecaster's steps to roll out after the frames), 0 when absent."""
    if HORIZON not in request.parameters:
        return 0
    value = _param(request.parameters[HORIZON])
    if type(value) is not int or value < 1:
        raise invalid(f"parameter {HORIZON} must be a positive int64, got {shown(value)}")
    return value


def model_outputs(mv: Any, asked: tuple[str, ...], explicit: bool, horizon: int) -> tuple[str, ...]:
    """The outputs to answer for this model: checked against what it has (INVALID_ARGUMENT naming them), or
    its defaults when the request named none (explicit False)."""
    if mv.kind != "vector":
        if horizon:
            raise invalid(f"parameter {HORIZON} is for forecasting models; {mv.key} is a token model")
        have = OUTPUTS
    else:
        named = vectors.named_outputs(mv)
        rolled = tuple("forecast_" + n for n in named) if horizon else ()
        have = ("outputs", "state", *named, *rolled)
        if not explicit:
            return named + rolled
    wrong = [n for n in asked if n not in have]
    if wrong:
        raise invalid(f"model {mv.key} has no output(s) {wrong}; it has {list(have)}")
    return asked


def read_frames(request: Any, mv: Any) -> np.ndarray:
    """The `inputs` input of a vector model's request, FP32 [1, T, F], as float32 (T, F) (checked for
    NaN and infinity by the engine)."""
    F = mv.features
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != VECTOR_INPUT:
        names = [i.name for i in inputs]
        raise invalid(f"model {mv.key} takes exactly one input named {VECTOR_INPUT!r} (FP32, shape [1, T, {F}]: "
                      f"frames), got {names}")
    tensor = inputs[0]
    shape = list(tensor.shape)
    if len(shape) != 3 or shape[0] != 1 or shape[2] != F or shape[1] < 1:
        raise invalid(f"input {VECTOR_INPUT!r} must have shape [1, T, {F}] with T >= 1 for {mv.key}, got {shape}")
    if tensor.datatype != "FP32":
        raise invalid(f"input {VECTOR_INPUT!r} must be FP32, got {tensor.datatype or 'no datatype'}")
    count = shape[1] * F
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1 or len(raw[0]) != count * 4:
            got = sum(len(r) for r in raw)
            raise invalid(f"input {VECTOR_INPUT!r}: raw_input_contents has {got} bytes in {len(raw)} tensor(s), "
                          f"shape {shape} of FP32 needs {count * 4} in 1")
        return np.frombuffer(raw[0], dtype="<f4").reshape(shape[1], F)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise invalid(f"input {VECTOR_INPUT!r}: contents.fp32_contents has {len(values)} values, "
                      f"shape {shape} needs {count}")
    return np.fromiter(values, dtype=np.float32, count=count).reshape(shape[1], F)


def read_input(request: Any, mv: Any) -> list[int] | np.ndarray:
    """What the request feeds, for the model it lands on: token ids, or frames (T, F)."""
    if mv.kind == "vector":
        return read_frames(request, mv)
    try:
        return read_tokens(request)
    except InvalidArgument:  # say so when the request carries a vector model's frames
        if any(i.name == VECTOR_INPUT for i in request.inputs):
            raise invalid(f"model {mv.key} is a token model: it takes {INPUT!r} (INT64, shape [1, T]), not "
                          f"{VECTOR_INPUT!r} frames") from None
        raise


def fill_vector_response(response: Any, names: tuple[str, ...], mv: Any, outputs: np.ndarray,
                         state: np.ndarray | None, forecast: np.ndarray | None) -> None:
    """A vector model's asked outputs as FP32 raw_output_contents: [1, T, .] per step, [1, H, F] rolled out."""
    parts = {"outputs": outputs, **vectors.answer(mv, outputs)}  # (T, .)
    if forecast is not None:
        parts.update({"forecast_" + k: v for k, v in vectors.answer(mv, forecast).items()})  # (H, F)
    for name in names:
        data = state[None] if name == "state" else parts[name][None]
        _add(response, name, data)


def _add(response: Any, name: str, data: np.ndarray) -> None:
    out = response.outputs.add()
    out.name = name
    out.datatype = "FP32"
    out.shape.extend(data.shape)
    response.raw_output_contents.append(np.ascontiguousarray(data, dtype="<f4").tobytes())


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
