"""The native rnnserve.v1 servicer: translates messages to engine calls and ServeErrors to status codes."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from ..v1 import rnnserve_pb2 as pb
from ..v1 import rnnserve_pb2_grpc as pb_grpc
from . import vectors
from .engine import Engine
from .errors import Aborted, FailedPrecondition, InvalidArgument, ServeError
from .repository import ModelVersion
from .sampling import top_k as sample_top_k
from .work import FeedResult

log = logging.getLogger(__name__)

def _cut_on_end(hold) -> None:
    """When the session leaves this stream, interrupt the stream's handler where it waits (it then ends the
    call with ABORTED); costs nothing per message, unlike racing every read against the hold."""
    task = asyncio.current_task()
    hold.ended.add_done_callback(lambda _f: task.cancel())


_INITIAL = {pb.INITIAL_STATE_MODEL: "model", pb.INITIAL_STATE_ZEROS: "zeros", pb.INITIAL_STATE_GIVEN: "given"}


def _start(initial: int, state) -> tuple[str, list[float] | None]:
    """An Open's or Reset's initial-state mode and vector, as the engine takes them."""
    if initial not in _INITIAL:
        raise InvalidArgument(f"unknown initial state mode {initial}")
    return _INITIAL[initial], (list(state) if initial == pb.INITIAL_STATE_GIVEN else None)
def _frames(frames: pb.Frames) -> np.ndarray:
    """Feed.frames -> float32 (T, F), or flat (T*F,) when `features` is 0; the engine checks it for the model."""
    values = np.asarray(frames.values, np.float32)
    if not frames.features:
        return values
    if values.size % frames.features:
        raise InvalidArgument(f"frames.values holds {values.size} floats, not whole frames of "
                              f"frames.features = {frames.features}")
    return values.reshape(-1, frames.features)


_OUTPUT = {pb.OUTPUT_NONE: "none", pb.OUTPUT_LAST: "last", pb.OUTPUT_ALL: "all"}
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP,
           "cancelled": pb.FINISH_REASON_CANCELLED}


def model_info(mv: ModelVersion, latest: bool) -> pb.ModelInfo:
    """ModelInfo of a loaded version."""
    m = mv.meta
    metrics = {k: float(v) for k, v in m.metrics.items() if isinstance(v, (int, float))}
    return pb.ModelInfo(name=mv.name, version=mv.version, cell=m.cell, vocab=mv.vocab, hidden_size=m.hidden_size,
                        state_size=mv.state_size, layers=m.layers, metrics=metrics, latest=latest,
                        input_kind=mv.kind, features=mv.features, task=m.task, classes=m.classes,
                        output_size=mv.output_size)


def vector_distributions(mv: ModelVersion, outputs: np.ndarray | None, top_k: int,
                         want_logits: bool) -> list[pb.Distribution]:
    """(n, O) raw outputs of a vector model -> one Distribution each: probs (and top-k classes), or the
    forecast's mean and spread; the raw outputs as `logits` when asked."""
    if outputs is None:
        return []
    parts = vectors.answer(mv, outputs)
    cols = {name: a.tolist() for name, a in parts.items()}
    name_of = {"probabilities": "probs", "mean": "mean", "spread": "spread"}
    rows = [{name_of[k]: cols[k][i] for k in cols} for i in range(len(outputs))]
    if want_logits:
        for row, raw in zip(rows, outputs.tolist()):
            row["logits"] = raw
    if top_k and "probabilities" in parts:
        k = min(int(top_k), outputs.shape[1])
        ids, probs = sample_top_k(outputs, k)
        for row, i, q in zip(rows, ids[:, :k].tolist(), probs[:, :k].tolist()):
            row["top_ids"], row["top_probs"] = i, q
    return [pb.Distribution(**row) for row in rows]


def distributions(logits: np.ndarray | None, top_k: int, want_logits: bool,
                  top: tuple[np.ndarray, np.ndarray] | None = None) -> list[pb.Distribution]:
    """(n, V) logits -> one Distribution each: top-k ids/probabilities and/or the raw logits.

    `top`: (ids, probs) (n, >= k) already computed by the batcher for the whole batch, else computed here."""
    if logits is None:
        return []
    if not top_k and not want_logits:
        want_logits = True  # asked for a distribution but said nothing about its form: the full logits
    k = min(int(top_k), logits.shape[1])
    if not k:
        return [pb.Distribution(logits=row) for row in logits.tolist()]
    if top is None or top[0].shape[1] < k:
        top = sample_top_k(logits, k)
    ids, probs = top[0][:, :k].tolist(), top[1][:, :k].tolist()  # (n, k)
    if want_logits:
        return [pb.Distribution(top_ids=i, top_probs=q, logits=row) for i, q, row in zip(ids, probs, logits.tolist())]
    return [pb.Distribution(top_ids=i, top_probs=q) for i, q in zip(ids, probs)]


class RnnServeServicer(pb_grpc.RnnServeServicer):
    """rnnserve.v1.RnnServe on top of the engine."""

    def __init__(self, engine: Engine, metrics=None) -> None:
        self.engine = engine
        self.metrics = metrics

    def _count(self, e: ServeError) -> None:
        if self.metrics is not None:
            self.metrics.error(e.code.name)

    def _opened(self, info) -> pb.Opened:
        return pb.Opened(session_id=info.session_id, model=model_info(info.model, self._latest(info.model)),
                         steps=info.steps, resumed=info.resumed, idle_timeout_s=int(info.idle_timeout_s))

    def _latest(self, mv: ModelVersion) -> bool:
        return self.engine.is_latest(mv)

    async def _open(self, o: pb.Open):
        return await self.engine.open(o.model.name, o.model.version, *_start(o.initial, o.state))

    async def _feed(self, sid: str, f: pb.Feed) -> pb.FeedResult:
        if f.output not in _OUTPUT:
            raise InvalidArgument(f"unknown output mode {f.output}")
        which = f.WhichOneof("input")
        if which is None:
            raise InvalidArgument("feed has no input: set text, tokens or frames")
        if which == "frames":
            data = _frames(f.frames)
        else:
            data = f.text if which == "text" else list(f.tokens.ids)
        res: FeedResult = await self.engine.feed(sid, data, _OUTPUT[f.output], top_k=f.top_k, logits=f.logits,
                                                 horizon=f.horizon)
        mv = res.model
        if mv is None or mv.kind != "vector":
            return pb.FeedResult(fed=res.fed, steps=res.steps,
                                 distributions=distributions(res.logits, f.top_k, f.logits, res.top))
        return pb.FeedResult(fed=res.fed, steps=res.steps,
                             distributions=vector_distributions(mv, res.logits, f.top_k, f.logits),
                             forecast=vector_distributions(mv, res.forecast, 0, False))

    # -- the session stream ---------------------------------------------------------------------------
    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        """One stream: open/resume, then feed/generate/reset/close; errors answer in-stream. The stream holds
        its session: resumed on another stream or moved to another replica, it ends here with ABORTED."""
        sid, hold = "", None
        try:
            async for req in request_iterator:
                rid = req.request_id
                kind = req.WhichOneof("kind")
                try:
                    if kind in ("open", "resume"):
                        if kind == "open":
                            info = await self._open(req.open)
                        else:
                            info = await self.engine.resume(req.resume.session_id)
                        if hold is not None:
                            self.engine.detach(sid, hold)
                        sid, hold = info.session_id, self.engine.attach(info.session_id)
                        _cut_on_end(hold)
                        yield pb.SessionResponse(session_id=sid, request_id=rid, opened=self._opened(info))
                    elif kind is None:
                        raise InvalidArgument("empty request: set one of open, resume, feed, generate, reset, close")
                    elif not sid:
                        raise FailedPrecondition(f"no session on this stream yet: the first message must be open "
                                                 f"or resume, got {kind}")
                    elif kind == "feed":
                        fed = await self._feed(sid, req.feed)
                        yield pb.SessionResponse(session_id=sid, request_id=rid, fed=fed)
                    elif kind == "generate":
                        async for resp in self._generate(sid, rid, req.generate):
                            yield resp
                    elif kind == "reset":
                        steps = await self.engine.reset(sid, *_start(req.reset.initial, req.reset.state))
                        yield pb.SessionResponse(session_id=sid, request_id=rid, reset=pb.ResetDone(steps=steps))
                    elif kind == "close":
                        await self.engine.close(sid)
                        yield pb.SessionResponse(session_id=sid, request_id=rid, closed=pb.Closed(session_id=sid))
                        sid, hold = "", None
                except ServeError as e:
                    self._count(e)
                    yield pb.SessionResponse(session_id=sid, request_id=rid,
                                             error=pb.Error(code=e.code.value[0], message=e.message))
        except asyncio.CancelledError:
            if hold is None or not hold.ended.done():
                raise  # the call itself was cancelled (the client went away)
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):
                task.uncancel()
            raise Aborted(f"{hold.ended.result()}: this stream no longer holds it (resume it to continue)") from None
        finally:
            if hold is not None:
                self.engine.detach(sid, hold)

    async def _generate(self, sid: str, rid: int, g: pb.Generate) -> AsyncIterator[pb.SessionResponse]:
        gen = await self.engine.generate(sid, g.max_tokens, g.temperature, g.top_k, g.top_p,
                                         g.seed if g.HasField("seed") else None, list(g.stop), g.chunk_tokens)
        try:
            async for c in gen:
                chunk = pb.GenerateChunk(text=c.text, tokens=c.tokens, done=c.done,
                                         finish_reason=_FINISH.get(c.reason, pb.FINISH_REASON_UNSPECIFIED),
                                         steps=c.steps)
                yield pb.SessionResponse(session_id=sid, request_id=rid, chunk=chunk)
        finally:
            gen.cancel()  # client gone or stream broken: the row leaves the batch now

    # -- unary (a ServeError becomes the call's status in the ErrorInterceptor) ---------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.Opened:
        """Open a session without a stream."""
        return self._opened(await self._open(request.open))

    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        """One feed on a session by id."""
        return pb.StepResponse(session_id=request.session_id, result=await self._feed(request.session_id, request.feed))

    def _state(self, v) -> pb.StateResponse:
        return pb.StateResponse(session_id=v.session_id, model=pb.ModelRef(name=v.model.name,
                                version=v.model.version), state=v.state.tolist(), steps=v.steps,
                                logits=[] if v.logits is None else v.logits.tolist())

    async def GetState(self, request: pb.GetStateRequest, context) -> pb.StateResponse:
        """Export a session: state vector, step count and last logits."""
        return self._state(await self.engine.get_state(request.session_id))

    async def SetState(self, request: pb.SetStateRequest, context) -> pb.StateResponse:
        """Import a state vector (and the last logits and step count, when given) into a session."""
        return self._state(await self.engine.set_state(
            request.session_id, list(request.state), list(request.logits) if len(request.logits) else None,
            request.steps if request.HasField("steps") else None))

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.Opened:
        """A new session with the same state, last distribution and step count."""
        return self._opened(await self.engine.fork(request.session_id))

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.Closed:
        """Close a session by id."""
        return pb.Closed(session_id=await self.engine.close(request.session_id))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        """Every loaded version with its metadata."""
        return pb.ListModelsResponse(models=[model_info(mv, latest) for mv, latest in self.engine.list_models()])
