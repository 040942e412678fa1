"""Asyncio client for rnnserve (grpc.aio): streaming sessions and the unary helpers."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
import grpc.aio
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


class AsyncSession:
    """One streaming conversation with a server-side session (asyncio); requests go one at a time."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self._next_id = 0
        self._ended = False
        self._open_generation = False  # a generation the caller stopped reading early
        self.session_id = ""
        self.steps = 0
        self.finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
        self.opened = pb.Opened()

    async def _start(self, first: pb.SessionRequest) -> AsyncSession:
        try:
            self.opened = (await self._ask(first, "opened")).opened
        except RnnServeError:
            self.detach()
            raise
        self.session_id = self.opened.session_id
        self.steps = self.opened.steps
        return self

    @property
    def model(self) -> pb.ModelInfo:
        """The model (name, version, vocab, sizes) the session runs on."""
        return self.opened.model

    async def _send(self, req: pb.SessionRequest) -> None:
        if self._ended:
            raise RnnServeError(grpc.StatusCode.FAILED_PRECONDITION, "the session stream is closed",
                                self.session_id)
        if self._open_generation:
            await self._drain()
        self._next_id += 1
        req.request_id = self._next_id
        try:
            await self._call.write(req)
        except grpc.RpcError as err:
            self._ended = True
            raise RnnServeError.from_rpc(err, self.session_id) from None
        except grpc.aio.UsageError as err:
            self._ended = True
            raise RnnServeError(grpc.StatusCode.UNAVAILABLE, f"stream unusable: {err}", self.session_id) from None

    async def _drain(self) -> None:
        """Read and drop the rest of a generation the caller abandoned, so answers stay in step."""
        self._open_generation = False
        while True:
            resp = await self._read()
            if resp.WhichOneof("kind") != "chunk" or resp.chunk.done:
                return

    async def _read(self) -> pb.SessionResponse:
        try:
            resp = await self._call.read()
        except grpc.RpcError as err:
            self._ended = True
            raise RnnServeError.from_rpc(err, self.session_id) from None
        if resp is grpc.aio.EOF:
            self._ended = True
            code = await self._call.code()
            details = await self._call.details()
            if code == grpc.StatusCode.OK:
                code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream"
            raise RnnServeError(code, details or "", self.session_id)
        return resp

    async def _ask(self, req: pb.SessionRequest, want: str) -> pb.SessionResponse:
        await self._send(req)
        return check(await self._read(), want, self.session_id)

    async def feed(self, data: str | Sequence[int], output: str | int = "last", top_k: int = 0,
                   logits: bool = False) -> pb.FeedResult:
        """Advance the state over text or token ids; returns the distributions asked for by `output`."""
        resp = await self._ask(pb.SessionRequest(feed=feed_message(data, output, top_k, logits)), "fed")
        self.steps = resp.fed.steps
        return resp.fed

    async def generate_chunks(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                              top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                              chunk_tokens: int = 0) -> AsyncIterator[pb.GenerateChunk]:
        """Sample on the server; yields each GenerateChunk as it arrives (the last has done=True)."""
        msg = generate_message(max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens)
        await self._send(pb.SessionRequest(generate=msg))
        self._open_generation = True
        while True:
            try:
                chunk = check(await self._read(), "chunk", self.session_id).chunk
            except RnnServeError:
                self._open_generation = False
                raise
            self.steps = chunk.steps
            yield chunk
            if chunk.done:
                self._open_generation = False
                self.finish_reason = chunk.finish_reason
                return

    async def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                       chunk_tokens: int = 0) -> AsyncIterator[str]:
        """Sample on the server; yields text chunks as they arrive. Stopping early is fine."""
        async for chunk in self.generate_chunks(max_tokens, temperature, top_k, top_p, seed, stop,
                                                chunk_tokens):
            if chunk.text:
                yield chunk.text

    async def reset(self, initial: Initial = "model") -> None:
        """Start the sequence over from `initial` ("model", "zeros" or a vector); the id stays."""
        await self._ask(pb.SessionRequest(reset=pb.Reset(**initial_fields(initial))), "reset")
        self.steps = 0

    async def close(self) -> None:
        """Close the session on the server (its state is dropped) and end the stream."""
        if not self._ended:
            try:
                await self._ask(pb.SessionRequest(close=pb.Close()), "closed")
            finally:
                self.detach()

    def detach(self) -> None:
        """End the stream but keep the session on the server, resumable by id until its idle timeout."""
        self._ended = True
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient:
    """An asyncio connection to an rnnserve server; use as an async context manager or await close()."""

    def __init__(self, target: str = "127.0.0.1:8001", timeout: float | None = 30.0,
                 channel: grpc.aio.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = metadata
        self._channel = channel or grpc.aio.insecure_channel(target, options=DEFAULT_OPTIONS)
        self._stub = rnnserve_pb2_grpc.RnnServeStub(self._channel)

    async def _unary(self, method, request, session_id: str = ""):
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            raise RnnServeError.from_rpc(err, session_id) from None

    async def session(self, model: str, version: int = 0, initial: Initial = "model") -> AsyncSession:
        """Open a new streaming session on a model (version 0 = latest)."""
        first = pb.SessionRequest(open=open_message(model, version, initial))
        return await AsyncSession(self._stub.Session(metadata=self.metadata))._start(first)

    async def resume(self, session_id: str) -> AsyncSession:
        """Reattach a streaming session to an existing session id; its state carries on."""
        first = pb.SessionRequest(resume=pb.Resume(session_id=session_id))
        return await AsyncSession(self._stub.Session(metadata=self.metadata))._start(first)

    async def open_session(self, model: str, version: int = 0, initial: Initial = "model") -> pb.Opened:
        """Unary open: returns Opened (session_id, model info)."""
        return await self._unary(self._stub.OpenSession,
                                 pb.OpenSessionRequest(open=open_message(model, version, initial)))

    async def step(self, session_id: str, data: str | Sequence[int], output: str | int = "last",
                   top_k: int = 0, logits: bool = False) -> pb.FeedResult:
        """Unary feed on a session by id."""
        req = pb.StepRequest(session_id=session_id, feed=feed_message(data, output, top_k, logits))
        return (await self._unary(self._stub.Step, req, session_id)).result

    async def get_state(self, session_id: str) -> pb.StateResponse:
        """A session's state vector, model and step count (export, migrate)."""
        return await self._unary(self._stub.GetState, pb.GetStateRequest(session_id=session_id), session_id)

    async def set_state(self, session_id: str, state: Sequence[float]) -> pb.StateResponse:
        """Replace a session's state vector (import, migrate)."""
        req = pb.SetStateRequest(session_id=session_id, state=[float(x) for x in state])
        return await self._unary(self._stub.SetState, req, session_id)

    async def close_session(self, session_id: str) -> None:
        """Close a session by id."""
        await self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), session_id)

    async def list_models(self) -> list[pb.ModelInfo]:
        """Every loaded model version with its metadata."""
        return list((await self._unary(self._stub.ListModels, pb.ListModelsRequest())).models)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
