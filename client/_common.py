"""Pieces shared by the sync and asyncio clients: the error type and request builders."""
from __future__ import annotations

from collections.abc import Sequence

import grpc
import rnnserve.v1.rnnserve_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_OUTPUTS = {"none": pb.OUTPUT_NONE, "last": pb.OUTPUT_LAST, "all": pb.OUTPUT_ALL}
_INITIALS = {"model": pb.INITIAL_STATE_MODEL, "zeros": pb.INITIAL_STATE_ZEROS}

# Large enough for a full-logits OUTPUT_ALL feed of a long chunk; the server enforces its own limit.
DEFAULT_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)

Initial = str | Sequence[float]
"""Where a sequence starts: "model" (the model's own initial state), "zeros", or a state vector."""


class RnnServeError(Exception):
    """A failed request: the gRPC status code and the server's message (stream errors included)."""

    def __init__(self, code: grpc.StatusCode, message: str, session_id: str = "") -> None:
        self.code = code
        self.message = message
        self.session_id = session_id
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, session_id: str = "") -> RnnServeError:
        """Wrap a grpc.RpcError (sync or aio) so callers handle one exception type."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", session_id)

    @classmethod
    def from_stream(cls, error: pb.Error, session_id: str = "") -> RnnServeError:
        """Wrap an `error` answer inside a Session stream."""
        return cls(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, session_id)


def initial_fields(initial: Initial) -> dict:
    """Open/Reset fields for an initial state given as "model", "zeros" or a vector."""
    if isinstance(initial, str):
        if initial not in _INITIALS:
            raise ValueError(f"initial must be 'model', 'zeros' or a state vector, got {initial!r}")
        return {"initial": _INITIALS[initial]}
    return {"initial": pb.INITIAL_STATE_GIVEN, "state": [float(x) for x in initial]}


def open_message(model: str, version: int = 0, initial: Initial = "model") -> pb.Open:
    """The Open message for a model name/version and initial state."""
    return pb.Open(model=pb.ModelRef(name=model, version=version), **initial_fields(initial))


def feed_message(data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
                 logits: bool = False) -> pb.Feed:
    """A Feed of text (str) or token ids (ints), asking for `output` ("none", "last", "all")."""
    if isinstance(output, str):
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(_OUTPUTS)}, got {output!r}")
        output = _OUTPUTS[output]
    if isinstance(data, str):
        return pb.Feed(text=data, output=output, top_k=top_k, logits=logits)
    return pb.Feed(tokens=pb.TokenIds(ids=list(data)), output=output, top_k=top_k, logits=logits)


def generate_message(max_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                     seed: int | None = None, stop: Sequence[str] = (), chunk_tokens: int = 0) -> pb.Generate:
    """A Generate request; seed None samples at random."""
    msg = pb.Generate(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      stop=list(stop), chunk_tokens=chunk_tokens)
    if seed is not None:
        msg.seed = seed
    return msg


def check(resp: pb.SessionResponse, want: str, session_id: str) -> pb.SessionResponse:
    """Raise the stream's error answer, or a protocol error if the answer is not of kind `want`."""
    kind = resp.WhichOneof("kind")
    if kind == "error":
        raise RnnServeError.from_stream(resp.error, resp.session_id or session_id)
    if kind != want:
        raise RnnServeError(grpc.StatusCode.INTERNAL, f"expected a {want!r} answer, got {kind!r}", session_id)
    return resp
