"""Synchronous client for rnnserve: streaming sessions and the unary helpers."""
from __future__ import annotations

import logging
import queue
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc
import rnnserve.v1.rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc

from client._common import (
    DEFAULT_OPTIONS,
    Initial,
    RnnServeError,
    check,
    feed_message,
    generate_message,
    initial_fields,
    open_message,
)

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
        self._next_id = 0
        self._ended = False
        self._open_generation = False  # a generation the caller stopped reading early
        self.session_id = ""
        self.steps = 0
        self.finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
        try:
            opened = self._ask(first, "opened").opened
        except RnnServeError:
            self.detach()
            raise
        self.opened: pb.Opened = opened
        self.session_id = opened.session_id
        self.steps = opened.steps

    @property
    def model(self) -> pb.ModelInfo:
        """The model (name, version, vocab, sizes) the session runs on."""
        return self.opened.model

    def _send(self, req: pb.SessionRequest) -> int:
        if self._ended:
            raise RnnServeError(grpc.StatusCode.FAILED_PRECONDITION, "the session stream is closed",
                                self.session_id)
        if self._open_generation:
            self._drain()
        self._next_id += 1
        req.request_id = self._next_id
        self._requests.put(req)
        return self._next_id

    def _drain(self) -> None:
        """Read and drop the rest of a generation the caller abandoned, so answers stay in step."""
        self._open_generation = False
        while True:
            resp = self._read()
            if resp.WhichOneof("kind") != "chunk" or resp.chunk.done:
                return

    def _read(self) -> pb.SessionResponse:
        try:
            return next(self._call)
        except StopIteration:
            self._ended = True
            raise RnnServeError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream",
                                self.session_id) from None
        except grpc.RpcError as err:
            self._ended = True
            raise RnnServeError.from_rpc(err, self.session_id) from None

    def _ask(self, req: pb.SessionRequest, want: str) -> pb.SessionResponse:
        self._send(req)
        return check(self._read(), want, self.session_id)

    def feed(self, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
             logits: bool = False) -> pb.FeedResult:
        """Advance the state over text or token ids; returns the distributions asked for by `output`."""
        result = self._ask(pb.SessionRequest(feed=feed_message(data, output, top_k, logits)), "fed").fed
        self.steps = result.steps
        return result

    def generate_chunks(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                        chunk_tokens: int = 0) -> Iterator[pb.GenerateChunk]:
        """Sample on the server; yields each GenerateChunk as it arrives (the last has done=True)."""
        msg = generate_message(max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens)
        self._send(pb.SessionRequest(generate=msg))
        self._open_generation = True
        while True:
            try:
                chunk = check(self._read(), "chunk", self.session_id).chunk
            except RnnServeError:
                self._open_generation = False
                raise
            self.steps = chunk.steps
            yield chunk
            if chunk.done:
                self._open_generation = False
                self.finish_reason = chunk.finish_reason
                return

    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                 seed: int | None = None, stop: Sequence[str] = (), chunk_tokens: int = 0) -> Iterator[str]:
        """Sample on the server; yields text chunks as they arrive. Stopping early is fine."""
        for chunk in self.generate_chunks(max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens):
            if chunk.text:
                yield chunk.text

    def reset(self, initial: Initial = "model") -> None:
        """Start the sequence over from `initial` ("model", "zeros" or a vector); the id stays."""
        self._ask(pb.SessionRequest(reset=pb.Reset(**initial_fields(initial))), "reset")
        self.steps = 0

    def close(self) -> None:
        """Close the session on the server (its state is dropped) and end the stream."""
        if not self._ended:
            try:
                self._ask(pb.SessionRequest(close=pb.Close()), "closed")
            finally:
                self.detach()

    def detach(self) -> None:
        """End the stream but keep the session on the server, resumable by id until its idle timeout."""
        if not self._ended:
            self._ended = True
            self._requests.put(_END)
        self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to an rnnserve server; use as a context manager or call close()."""

    def __init__(self, target: str = "127.0.0.1:8001", timeout: float | None = 30.0,
                 channel: grpc.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = metadata
        self._channel = channel or grpc.insecure_channel(target, options=DEFAULT_OPTIONS)
        self._stub = rnnserve_pb2_grpc.RnnServeStub(self._channel)

    def _unary(self, method, request, session_id: str = ""):
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise RnnServeError.from_rpc(err, session_id) from None

    def session(self, model: str, version: int = 0, initial: Initial = "model") -> Session:
        """Open a new streaming session on a model (version 0 = latest)."""
        return Session(self._stub, pb.SessionRequest(open=open_message(model, version, initial)), self.metadata)

    def resume(self, session_id: str) -> Session:
        """Reattach a streaming session to an existing session id; its state carries on."""
        return Session(self._stub, pb.SessionRequest(resume=pb.Resume(session_id=session_id)), self.metadata)

    def open_session(self, model: str, version: int = 0, initial: Initial = "model") -> pb.Opened:
        """Unary open: returns Opened (session_id, model info)."""
        return self._unary(self._stub.OpenSession,
                           pb.OpenSessionRequest(open=open_message(model, version, initial)))

    def step(self, session_id: str, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
             logits: bool = False) -> pb.FeedResult:
        """Unary feed on a session by id."""
        req = pb.StepRequest(session_id=session_id, feed=feed_message(data, output, top_k, logits))
        return self._unary(self._stub.Step, req, session_id).result

    def get_state(self, session_id: str) -> pb.StateResponse:
        """A session's state vector, model and step count (export, migrate)."""
        return self._unary(self._stub.GetState, pb.GetStateRequest(session_id=session_id), session_id)

    def set_state(self, session_id: str, state: Sequence[float]) -> pb.StateResponse:
        """Replace a session's state vector (import, migrate)."""
        req = pb.SetStateRequest(session_id=session_id, state=[float(x) for x in state])
        return self._unary(self._stub.SetState, req, session_id)

    def close_session(self, session_id: str) -> None:
        """Close a session by id."""
        self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), session_id)

    def list_models(self) -> list[pb.ModelInfo]:
        """Every loaded model version with its metadata."""
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest()).models)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
