"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) on the engine.

Served on the same port as the native protocol, with Triton's sequence extension: request
parameters `sequence_id` (int64 or string), `sequence_start`, `sequence_end`. A sequence is an
engine session like any other. Triton's statistics (statistics.py) and model repository (control.py)
extensions are served too. Messages come from a private descriptor pool (descriptors.py),
so this module never clashes with tritonclient's stubs in one process.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc

from .. import auth, inputs
from ..engine import Engine
from ..errors import Aborted, NotFound, ServeError
from ..settings import Settings
from .codec import (
    Sequence,
    fill_response,
    fill_vector_response,
    model_outputs,
    read_horizon,
    read_input,
    read_sequence,
    requested_outputs,
)
from .config import fill_config, fill_metadata, parse_version
from .control import Control
from .descriptors import SERVICE, messages
from .sequences import Sequences
from .statistics import Statistics

log = logging.getLogger(__name__)

SERVER_NAME = "rnnserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("sequence", "model_configuration", "statistics", "model_repository")
# Response parameter set on the answer to a sequence_start that replaced a live sequence.
RESTARTED = "sequence_restarted"
# Response parameter on the answer to a sequence_start: the engine session behind the sequence
# (usable with the native protocol's GetState/SetState).
SESSION_ID = "rnnserve_session_id"


class KServeServicer:
    """Handlers of GRPCInferenceService; every inference goes through the engine (batcher, sessions)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.pb = messages()
        self.sequences = Sequences(engine)
        self.stats = Statistics(engine, metrics)
        self.control = Control(engine)

    def _count(self, code: grpc.StatusCode) -> None:
        """Count an error answered inside a stream (the ErrorInterceptor counts the calls' own statuses)."""
        if self.metrics is not None:
            self.metrics.error(code.name)

    # -- health and metadata --------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The process answers: live."""
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready when a model is loaded and the server is not draining."""
        return self.pb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Whether that model (version) is loaded; a malformed version is INVALID_ARGUMENT."""
        version = parse_version(request.version)
        try:
            self.engine.model(request.name, version)
            ready = self.engine.accepting
        except NotFound:
            ready = False
        return self.pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Name, version and extensions (`sequence`, `statistics`, `model_repository` among them)."""
        return self.pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    def _requested_model(self, request: Any) -> Any:
        """The model version a metadata/config request names (NOT_FOUND / INVALID_ARGUMENT otherwise)."""
        return self.engine.model(request.name, parse_version(request.version))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Versions, platform, inputs and outputs of a model."""
        mv = self._requested_model(request)
        resp = self.pb.ModelMetadataResponse()
        fill_metadata(resp, mv, self.engine.versions(mv.name))
        return resp

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's model configuration, with `sequence_batching` set: the model is stateful."""
        mv = self._requested_model(request)
        resp = self.pb.ModelConfigResponse()
        fill_config(resp.config, mv, self.engine.versions(mv.name), self.settings, self.pb)
        return resp

    # -- inference ------------------------------------------------------------------------------------
    async def _infer(self, req: Any, resp: Any, seq: Sequence) -> str:
        """Answer one request into resp (a ModelInferResponse); returns the session it ran on ("" if none or
        ended with it); raises ServeError."""
        outputs = requested_outputs(req)
        version = parse_version(req.model_version)
        want_state = "state" in outputs
        engine = self.engine
        horizon = read_horizon(req)
        explicit = bool(req.outputs)

        def tokens_of(mv):  # checked against the model the request lands on, before any START
            nonlocal outputs
            outputs = model_outputs(mv, outputs, explicit, horizon)
            tokens = read_input(req, mv)  # a short list or an int64 array of ids, or float32 frames (T, F)
            engine.check_feed(mv, len(tokens), horizon=horizon)
            ids = inputs.check_input(mv, tokens)
            return tokens if type(tokens) is list else ids  # a checked short list: the engine checks it again fastest

        if seq.id is None:
            step = await self.sequences.stateless(req.model_name, version, tokens_of, want_state, horizon)
        else:
            key = (req.model_name, seq.id, auth.current.get().name)
            step = await self.sequences.run(key, seq, req.model_name, version, tokens_of, want_state, horizon)
        model = step.model
        resp.model_name, resp.model_version, resp.id = model.name, str(model.version), req.id
        if step.restarted:
            resp.parameters[RESTARTED].bool_param = True
        if step.session_id:
            resp.parameters[SESSION_ID].string_param = step.session_id
        if model.kind == "vector":
            fill_vector_response(resp, outputs, model, step.logits, step.state, step.forecast)
        else:
            fill_response(resp, outputs, step.logits, step.state)
        return step.held

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One inference; errors are the call's status (NOT_FOUND, INVALID_ARGUMENT, ...).

        A sequence's step runs in a task of its own, shielded: a client that goes away does not cut it (an
        END still closes). A stateless request keeps nothing, so it runs in the call's own task."""
        resp = self.pb.ModelInferResponse()
        t0 = time.perf_counter_ns()
        try:
            seq = read_sequence(request)
            if seq.id is None:
                await self._infer(request, resp, seq)
            else:
                await asyncio.shield(asyncio.get_running_loop().create_task(self._infer(request, resp, seq)))
        except Exception:  # counted as a failed request of the model it named; the status goes out as it is
            self.stats.record(request.model_name, request.model_version, False, time.perf_counter_ns() - t0)
            raise
        self.stats.record(resp.model_name, resp.model_version, True, time.perf_counter_ns() - t0)
        return resp

    async def _stream_one(self, req: Any) -> tuple[Any, str]:
        """One stream request -> (ModelStreamInferResponse, session it ran on); an error goes into error_message."""
        resp = self.pb.ModelStreamInferResponse()
        t0 = time.perf_counter_ns()
        try:
            held = await self._infer(req, resp.infer_response, read_sequence(req))  # filled in place: no copy
            r = resp.infer_response
            self.stats.record(r.model_name, r.model_version, True, time.perf_counter_ns() - t0)
            return resp, held
        except ServeError as e:
            self._count(e.code)
            text = f"{e.code.name}: {e.message}"
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug of ours: say so, keep the stream
            log.exception("KServe stream request %r failed", req.id)
            self._count(grpc.StatusCode.INTERNAL)
            text = "INTERNAL: the server failed on this request (see its log)"
        self.stats.record(req.model_name, req.model_version, False, time.perf_counter_ns() - t0)
        if req.id:
            text += f" [request id {req.id!r}]"
        resp = self.pb.ModelStreamInferResponse(error_message=text)  # a fresh one: no partial outputs
        resp.infer_response.model_name, resp.infer_response.id = req.model_name, req.id
        return resp, ""

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """Requests run concurrently across sequences, in order within one; answers go out as they finish.

        Each request is a task; answers go out one write at a time, in the order they finish, each written
        by the task that finds no write under way (it also writes those that finish meanwhile). Requests
        already read run to the end even when the client goes away (a step is never cut), their answers
        dropped. If a sequence this stream carries moves to another replica, the stream ends with ABORTED
        once the answers under way are written (the client resumes it there, or here, on a new stream)."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        holds: dict[str, Any] = {}
        moved: asyncio.Future = loop.create_future()
        unsent: deque = deque()  # answers waiting for the write under way
        writing = False

        def hold(sid: str) -> None:
            if sid not in holds and (h := self.engine.watch(sid)) is not None:
                holds[sid] = h
                h.ended.add_done_callback(lambda f: moved.done() or (moved.set_result(f.result()), me.cancel()))

        async def answer(req: Any) -> None:
            nonlocal writing
            try:
                resp, held = await self._stream_one(req)
                if held:
                    hold(held)
                unsent.append((resp, req.id))
                if writing:
                    return  # the task writing now sends it too
                writing = True
                try:
                    while unsent and not context.done():
                        resp, rid = unsent.popleft()
                        try:
                            await context.write(resp)
                        except Exception as e:  # noqa: BLE001 (the call ended while we wrote: nobody to answer)
                            log.debug("KServe stream answer %r dropped: %s", rid, e)
                finally:
                    writing = False
                    if context.done():
                        unsent.clear()
            finally:
                tasks.discard(asyncio.current_task())

        async def drain() -> None:
            while tasks:
                await asyncio.wait(list(tasks))

        me = asyncio.current_task()
        try:
            async for req in requests:
                tasks.add(loop.create_task(answer(req)))
        except asyncio.CancelledError:
            if not moved.done():
                raise  # the call itself was cancelled (the client went away)
            if hasattr(me, "uncancel"):
                me.uncancel()
            await drain()
            raise Aborted(f"a sequence on this stream: {moved.result()}; resume it on a new stream") from None
        except ServeError:  # a message that does not parse: the answers under way go out, then the status
            await drain()
            raise
        finally:
            for sid, h in holds.items():
                self.engine.unwatch(sid, h)
        await drain()

    # -- statistics and model control (statistics.py, control.py) -------------------------------------
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's inference statistics of every loaded version, of one model's, or of one version."""
        resp = self.pb.ModelStatisticsResponse()
        self.stats.fill(resp, request.name, request.version)
        return resp

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every model folder with each version's state (READY, UNLOADING, UNAVAILABLE) and why."""
        resp = self.pb.RepositoryIndexResponse()
        self.control.index(request, resp)
        return resp

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Load (or reload) a model from the repository; answers once it is served."""
        await self.control.load(request)
        return self.pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Unload a model (--model-control explicit); its live sequences run to their end."""
        await self.control.unload(request)
        return self.pb.RepositoryModelUnloadResponse()


def handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """A generic handler serving the declared RPCs; the undeclared or unserved ones answer UNIMPLEMENTED."""
    pb = servicer.pb
    served = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
              "ModelInfer", "ModelStreamInfer", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
              "RepositoryModelUnload")
    methods = {}
    for name in served:
        req_cls, resp_cls, client_stream, _ = pb.method_types(name)
        make = grpc.stream_stream_rpc_method_handler if client_stream else grpc.unary_unary_rpc_method_handler
        methods[name] = make(getattr(servicer, name), request_deserializer=req_cls.FromString,
                             response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)
