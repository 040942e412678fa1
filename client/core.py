"""The client's protocol core, with no network I/O: request builders, answer checks, a Session's bookkeeping.

`SessionCore` is one Session stream as a state machine: it numbers requests, checks that each answer
is of the kind asked for (raising the stream's `error` answers as RnnServeError), remembers a
generation the caller stopped reading so the shell drains it before the next request, and keeps the
step count and finish reason. `Call`s describe the unary RPCs. How a client reaches a server (TLS,
channel options, bearer tokens, the CLIs' flags) is connection.py. The sync (lib.py) and asyncio (aio.py)
clients only move these messages over a channel.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ..v1 import rnnserve_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_OUTPUTS = {"none": pb.OUTPUT_NONE, "last": pb.OUTPUT_LAST, "all": pb.OUTPUT_ALL}
_INITIALS = {"model": pb.INITIAL_STATE_MODEL, "zeros": pb.INITIAL_STATE_ZEROS}

ROUTING_HEADER = "x-rnnserve-session"  # a balancer hashes on it, so a session's requests reach one replica

Initial = str | Sequence[float]
"""Where a sequence starts: "model" (the model's own initial state), "zeros", or a state vector."""


def headline(task: str, metrics: Mapping[str, Any]) -> str | None:
    """A model's headline figure from its metrics: a classifier's test accuracy, a forecaster's test RMSE, else
    (and for a language model) the validation loss; None when none is recorded (or null: no validation ran).
    What `rnn-client models` and `rnn-export list` show."""
    own = {"classify": ("test_accuracy", "{:.1%}"), "forecast": ("test_rmse", "{:.4g}")}.get(task)
    for key, fmt in (*([own] if own else []), ("val_loss", "{:.4f}")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key} {fmt.format(value)}"
    return None


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


def routed(metadata: Sequence[tuple[str, str]] | None, session_id: str) -> list[tuple[str, str]]:
    """The call's metadata plus the routing header naming its session (none for a new session)."""
    out = [(k, v) for k, v in (metadata or ()) if k != ROUTING_HEADER]
    if session_id:
        out.append((ROUTING_HEADER, session_id))
    return out


# -- messages -----------------------------------------------------------------------------------------
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


def output_mode(output: str | int) -> int:
    """Feed.output for "none", "last" or "all" (an Output value passes through)."""
    if isinstance(output, str):
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(_OUTPUTS)}, got {output!r}")
        return _OUTPUTS[output]
    return output


def feed_message(data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
                 logits: bool = False) -> pb.Feed:
    """A Feed of text (str) or token ids (ints), asking for `output` ("none", "last", "all")."""
    output = output_mode(output)
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


# -- the session stream -------------------------------------------------------------------------------
class SessionCore:
    """One Session stream's protocol state: what to send next, what an answer means."""

    def __init__(self) -> None:
        self.next_id = 0
        self.ended = False
        self.draining = False  # a generation the caller stopped reading: drain it before the next request
        self.session_id = ""
        self.steps = 0
        self.finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
        self.opened = pb.Opened()

    def stamp(self, req: pb.SessionRequest) -> pb.SessionRequest:
        """Number a request to send now (the shell drains an abandoned generation first)."""
        if self.ended:
            raise RnnServeError(grpc.StatusCode.FAILED_PRECONDITION, "the session stream is closed", self.session_id)
        self.next_id += 1
        req.request_id = self.next_id
        return req

    def check(self, resp: pb.SessionResponse, want: str) -> pb.SessionResponse:
        """Raise the stream's error answer, or a protocol error if the answer is not of kind `want`."""
        kind = resp.WhichOneof("kind")
        if kind == "error":
            raise RnnServeError.from_stream(resp.error, resp.session_id or self.session_id)
        if kind != want:
            raise RnnServeError(grpc.StatusCode.INTERNAL, f"expected a {want!r} answer, got {kind!r}",
                                self.session_id)
        return resp

    def on_opened(self, resp: pb.SessionResponse) -> pb.Opened:
        """The answer to open/resume: remember the session."""
        self.opened = self.check(resp, "opened").opened
        self.session_id = self.opened.session_id
        self.steps = self.opened.steps
        return self.opened

    def on_fed(self, resp: pb.SessionResponse) -> pb.FeedResult:
        """The answer to a feed: the step count moves on."""
        fed = self.check(resp, "fed").fed
        self.steps = fed.steps
        return fed

    def on_reset(self, resp: pb.SessionResponse) -> None:
        """The answer to a reset."""
        self.check(resp, "reset")
        self.steps = 0

    def on_closed(self, resp: pb.SessionResponse) -> None:
        """The answer to a close."""
        self.check(resp, "closed")

    def generating(self) -> None:
        """A generate went out: until its last chunk is read, later requests must drain it."""
        self.draining = True

    def on_chunk(self, resp: pb.SessionResponse) -> pb.GenerateChunk:
        """One answer of a generation: a chunk (the last one has done=True) or an error that ends it."""
        try:
            chunk = self.check(resp, "chunk").chunk
        except RnnServeError:
            self.draining = False
            raise
        self.steps = chunk.steps
        if chunk.done:
            self.draining = False
            self.finish_reason = chunk.finish_reason
        return chunk

    def drained(self, resp: pb.SessionResponse) -> bool:
        """Drop one answer of an abandoned generation; True once it has ended."""
        if resp.WhichOneof("kind") != "chunk" or resp.chunk.done:
            self.draining = False
            return True
        return False

    def stream_ended(self, err: grpc.RpcError | None = None) -> RnnServeError:
        """The stream is over (server ended it, or an RPC error): the error to raise."""
        self.ended = True
        if err is None:
            return RnnServeError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream", self.session_id)
        return RnnServeError.from_rpc(err, self.session_id)


# -- unary calls ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One unary RPC: the stub method's name, the request, how to unpack the answer, the session it is about."""

    method: str
    request: Any
    unpack: Callable[[Any], Any] = lambda r: r
    session_id: str = ""


def open_session(model: str, version: int = 0, initial: Initial = "model") -> Call:
    """OpenSession: returns Opened."""
    return Call("OpenSession", pb.OpenSessionRequest(open=open_message(model, version, initial)))


def step(session_id: str, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
         logits: bool = False) -> Call:
    """Step: returns the FeedResult."""
    req = pb.StepRequest(session_id=session_id, feed=feed_message(data, output, top_k, logits))
    return Call("Step", req, lambda r: r.result, session_id)


def get_state(session_id: str) -> Call:
    """GetState: returns the StateResponse."""
    return Call("GetState", pb.GetStateRequest(session_id=session_id), session_id=session_id)


def set_state(session_id: str, state: Sequence[float]) -> Call:
    """SetState: returns the StateResponse."""
    req = pb.SetStateRequest(session_id=session_id, state=[float(x) for x in state])
    return Call("SetState", req, session_id=session_id)


def fork_session(session_id: str) -> Call:
    """ForkSession: returns the new session's Opened."""
    return Call("ForkSession", pb.ForkSessionRequest(session_id=session_id), session_id=session_id)


def close_session(session_id: str) -> Call:
    """CloseSession: returns None."""
    return Call("CloseSession", pb.CloseSessionRequest(session_id=session_id), lambda r: None, session_id)


def list_models() -> Call:
    """ListModels: returns the list of ModelInfo."""
    return Call("ListModels", pb.ListModelsRequest(), lambda r: list(r.models))
