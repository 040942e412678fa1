"""Synchronous client for rnnserve: the I/O shell of client.core over a grpc channel."""
from __future__ import annotations

import logging
import queue
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ..v1 import rnnserve_pb2 as pb
from ..v1 import rnnserve_pb2_grpc
from . import core, frames
from .connection import Pem, client_connection
from .core import Initial, RnnServeError, SessionCore

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)
_END = object()


class Session:
    """One streaming conversation with a server-side session; requests go one at a time."""

    def __init__(self, stub: rnnserve_pb2_grpc.RnnServeStub, first: pb.SessionRequest,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Session(iter(self._requests.get, _END), metadata=metadata)
        self._cancelled = False
        self.core = SessionCore()
        try:
            self.core.on_opened(self._ask(first))
        except RnnServeError:
            self.detach()
            raise

    session_id = property(lambda self: self.core.session_id, doc="The server-side session id.")
    steps = property(lambda self: self.core.steps, doc="Tokens (or frames) the session has consumed.")
    finish_reason = property(lambda self: self.core.finish_reason, doc="How the last generation ended.")
    opened = property(lambda self: self.core.opened, doc="The Opened answer (session id, model, steps).")
    model = property(lambda self: self.core.opened.model, doc="The model the session runs on.")

    def _send(self, req: pb.SessionRequest) -> None:
        if self.core.draining:
            while not self.core.drained(self._read()):
                pass
        self._requests.put(self.core.stamp(req))

    def _read(self) -> pb.SessionResponse:
        try:
            return next(self._call)
        except StopIteration:
            raise self.core.stream_ended() from None
        except grpc.RpcError as err:
            raise self.core.stream_ended(err) from None

    def _ask(self, req: pb.SessionRequest) -> pb.SessionResponse:
        self._send(req)
        return self._read()

    def feed(self, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
             logits: bool = False) -> pb.FeedResult:
        """Advance the state over text or token ids; returns the distributions asked for by `output`."""
        return self.core.on_fed(self._ask(pb.SessionRequest(feed=core.feed_message(data, output, top_k, logits))))

    def feed_frames(self, data: frames.Frames, horizon: int = 0, output: str | int = "last",
                    logits: bool = False) -> frames.FrameResult:
        """Advance a vector model's state over frames ((T, F) or one (F,) frame); returns the answer at the
        last frame (`output` "all": at every frame) and, with `horizon` H, a forecaster's next H steps."""
        msg = frames.feed_message(data, output, horizon, logits)
        return frames.frame_result(self.core.on_fed(self._ask(pb.SessionRequest(feed=msg))), self.model)

    def generate_chunks(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                        chunk_tokens: int = 0) -> Iterator[pb.GenerateChunk]:
        """Sample on the server; yields each GenerateChunk as it arrives (the last has done=True)."""
        msg = core.generate_message(max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens)
        self._send(pb.SessionRequest(generate=msg))
        self.core.generating()
        while True:
            chunk = self.core.on_chunk(self._read())
            yield chunk
            if chunk.done:
                return

    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                 seed: int | None = None, stop: Sequence[str] = (), chunk_tokens: int = 0) -> Iterator[str]:
        """Sample on the server; yields text chunks as they arrive. Stopping early is fine."""
        for chunk in self.generate_chunks(max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens):
            if chunk.text:
                yield chunk.text

    def reset(self, initial: Initial = "model") -> None:
        """Start the sequence over from `initial` ("model", "zeros" or a vector); the id stays."""
        self.core.on_reset(self._ask(pb.SessionRequest(reset=pb.Reset(**core.initial_fields(initial)))))

    def close(self) -> None:
        """Close the session on the server (its state is dropped) and end the stream."""
        if not self.core.ended:
            try:
                self.core.on_closed(self._ask(pb.SessionRequest(close=pb.Close())))
            finally:
                self.detach()

    def detach(self) -> None:
        """End the stream but keep the session on the server, resumable by id until its idle timeout."""
        if not self.core.ended:
            self.core.ended = True
            self._requests.put(_END)
        if not self._cancelled:  # once: a second cancel() waits on the call's lock again
            self._cancelled = True
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to an rnnserve server; use as a context manager or call close()."""

    def __init__(self, target: str = "127.0.0.1:8001", timeout: float | None = 30.0,
                 channel: grpc.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None, *, token: str | None = None,
                 tls: bool = False, ca: Pem | None = None, cert: Pem | None = None, key: Pem | None = None,
                 server_name: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        conn = client_connection(target, channel, metadata, token=token, tls=tls, ca=ca, cert=cert, key=key,
                                 server_name=server_name)
        self.metadata = list(conn.metadata)
        self._channel = channel or conn.channel(grpc, target)
        self._stub = rnnserve_pb2_grpc.RnnServeStub(self._channel)

    def _unary(self, call: core.Call) -> Any:
        try:
            return call.unpack(getattr(self._stub, call.method)(
                call.request, timeout=self.timeout, metadata=core.routed(self.metadata, call.session_id)))
        except grpc.RpcError as err:
            raise RnnServeError.from_rpc(err, call.session_id) from None

    def session(self, model: str, version: int = 0, initial: Initial = "model") -> Session:
        """Open a new streaming session on a model (version 0 = latest)."""
        return Session(self._stub, pb.SessionRequest(open=core.open_message(model, version, initial)), self.metadata)

    def resume(self, session_id: str) -> Session:
        """Reattach a streaming session to an existing session id; its state carries on."""
        return Session(self._stub, pb.SessionRequest(resume=pb.Resume(session_id=session_id)),
                       core.routed(self.metadata, session_id))

    def open_session(self, model: str, version: int = 0, initial: Initial = "model") -> pb.Opened:
        """Unary open: returns Opened (session_id, model info)."""
        return self._unary(core.open_session(model, version, initial))

    def step(self, session_id: str, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
             logits: bool = False) -> pb.FeedResult:
        """Unary feed on a session by id."""
        return self._unary(core.step(session_id, data, output, top_k, logits))

    def step_frames(self, session_id: str, data: frames.Frames, horizon: int = 0, output: str | int = "last",
                    logits: bool = False, model: pb.ModelInfo | None = None) -> frames.FrameResult:
        """Unary feed of frames on a vector model's session by id; `model` (its ModelInfo) names classes."""
        return self._unary(frames.step(session_id, data, horizon, output, logits, model))

    def get_state(self, session_id: str) -> pb.StateResponse:
        """A session's state vector, model and step count (export, migrate)."""
        return self._unary(core.get_state(session_id))

    def set_state(self, session_id: str, state: Sequence[float]) -> pb.StateResponse:
        """Replace a session's state vector (import, migrate)."""
        return self._unary(core.set_state(session_id, state))

    def fork(self, session_id: str) -> pb.Opened:
        """A new session with the same state, last distribution and step count (parallel continuations)."""
        return self._unary(core.fork_session(session_id))

    def close_session(self, session_id: str) -> None:
        """Close a session by id."""
        self._unary(core.close_session(session_id))

    def list_models(self) -> list[pb.ModelInfo]:
        """Every loaded model version with its metadata."""
        return self._unary(core.list_models())

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
