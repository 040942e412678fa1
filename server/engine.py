"""The serving engine: the one facade both servicers (native and KServe v2) call.

Every method raises a server.errors.ServeError subclass for anything the client did wrong
(its `.code` is the gRPC status to answer with). Sessions, batching and onnxruntime stay behind it.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import inputs
from . import providers as prov
from .batcher import Batcher
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable, shown
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable
from .settings import Settings
from .work import Chunk, GenRow

log = logging.getLogger(__name__)

INITIAL_MODES = ("model", "zeros", "given")
RESUME_WAIT_S = 10.0  # how long a resume waits for work still running from an earlier stream
OUTPUTS = ("none", "last", "all")


@dataclass(frozen=True)
class SessionInfo:
    """What open/resume return."""

    session_id: str
    model: ModelVersion
    steps: int
    resumed: bool
    idle_timeout_s: float


@dataclass(frozen=True)
class FeedResult:
    """What feed returns: tokens consumed, logits (n, V) per `output` (None for "none"), total steps."""

    fed: int
    logits: np.ndarray | None
    steps: int
    top: tuple[np.ndarray, np.ndarray] | None = None  # (n, >= top_k) ids, probs when feed asked top_k


@dataclass(frozen=True)
class StateView:
    """A session's state vector (S,) float32 with its model and step count."""

    session_id: str
    model: ModelVersion
    state: np.ndarray
    steps: int


class Generation:
    """A running generation: iterate it for Chunks; cancel() (also on client disconnect) stops it at once."""

    def __init__(self, engine: Engine, batcher: Batcher, row: GenRow) -> None:
        self._engine = engine
        self._batcher = batcher
        self.row = row
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                chunk = await self.row.queue.get()
                if isinstance(chunk, BaseException):  # the batcher ended it with an error (a non-finite step)
                    raise chunk
                yield chunk
                if chunk.done:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop generating now; the session keeps the state reached so far."""
        self._batcher.cancel(self.row)
        if not self.finished.done():
            self.finished.set_result(None)
        self._engine._generations.discard(self)


class Engine:
    """Owns the repository, the session table and one batcher per loaded model version."""

    def __init__(self, settings: Settings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.table = SessionTable(settings.max_sessions, settings.idle_timeout,
                                  on_change=(metrics.live_sessions if metrics else None))
        self.repo: Repository | None = None
        self.batchers: dict[ModelVersion, Batcher] = {}
        self.draining = False
        self.provider = ""
        self._generations: set[Generation] = set()
        self._retired: set[ModelVersion] = set()
        self.on_models_changed: list = []  # async callables run after a scan changed what is served
        self._watcher: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Choose the provider, load the repository, start a batcher per version."""
        providers, why = prov.choose(self.settings.device)
        self.provider = providers[0]
        log.info("onnxruntime provider: %s (%s)", self.provider, why)
        self.repo = Repository(self.settings.models, providers, self.settings.serve_versions,
                               self.settings.ort_threads, self.settings.ort_gen_threads)
        loop = asyncio.get_running_loop()
        added, _ = await loop.run_in_executor(None, self.repo.scan)
        self._count_broken()
        for mv in added:
            self._add(mv)
        if not self.batchers:
            log.warning("no serveable model under %s", self.settings.models)
        if self.settings.poll_interval > 0:
            self._watcher = loop.create_task(self._watch(), name="repository-watch")

    async def _watch(self) -> None:
        """Rescan the repository every poll_interval seconds (a timer, not a busy loop)."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.refresh()
            except Exception:  # a bad scan must not stop serving what is loaded
                log.exception("repository scan failed")

    async def refresh(self) -> None:
        """Load new versions; versions no longer wanted take no new sessions and unload when unused."""
        added, removed = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan)
        self._count_broken()
        for mv in added:
            self._add(mv)
        for mv in removed:
            self.repo.unload(mv)
            self._retired.add(mv)
            log.info("retired %s: no new sessions, %d live", mv.key, self.table.sessions_of(mv))
        if added or removed:
            for hook in self.on_models_changed:
                await hook()
        for mv in list(self._retired):
            if self.table.sessions_of(mv) == 0:
                self._retired.discard(mv)
                b = self.batchers.pop(mv, None)
                self.table.pools.pop(mv, None)
                if b is not None:
                    await b.stop()
                log.info("unloaded %s", mv.key)

    def _count_broken(self) -> None:
        if self.metrics is not None:
            self.metrics.broken_versions(len(self.repo.failed))

    def _add(self, mv: ModelVersion) -> None:
        b = Batcher(mv, self.table.pool(mv), self.table, self.settings.max_batch,
                    self.settings.max_wait_ms / 1000.0, self.metrics, self.settings.inline_rows,
                    self.settings.feed_slice_ms / 1000.0)
        b.start()
        self.batchers[mv] = b

    @property
    def ready(self) -> bool:
        """Serving: at least one model loaded and not draining."""
        return bool(self.batchers) and not self.draining

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (False once draining for shutdown)."""
        return not self.draining

    async def drain(self, grace: float) -> None:
        """Refuse new work, let generations and long feeds finish within `grace` seconds, then cut the rest."""
        self.draining = True
        pending = [g.finished for g in self._generations]
        pending += [j.future for b in self.batchers.values() for j in b.long.jobs]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for b in self.batchers.values():
            b.cut_all()

    async def stop(self) -> None:
        """Stop batchers and timers."""
        if self._watcher is not None:
            self._watcher.cancel()
        self.table.stop()
        for b in self.batchers.values():
            await b.stop()

    # -- models ---------------------------------------------------------------------------------------
    def list_models(self) -> list[tuple[ModelVersion, bool]]:
        """Every loaded version with whether it is the latest (the default) of its model."""
        if self.repo is None:
            return []
        return [(mv, self.repo.get(mv.name) is mv) for mv in self.repo.all()]

    def is_latest(self, mv: ModelVersion) -> bool:
        """Whether this version is the one new sessions of its model get (the default)."""
        return self.repo is not None and self.repo.get(mv.name) is mv

    def versions(self, name: str) -> list[int]:
        """The loaded versions of one model, ascending."""
        return [mv.version for mv, _ in self.list_models() if mv.name == name]

    def model(self, name: str, version: int = 0) -> ModelVersion:
        """A loaded model version (0 = latest); NOT_FOUND naming what exists."""
        mv = self.repo.get(name, version) if self.repo else None
        if mv is None:
            if not name:
                raise InvalidArgument("no model named: set the model name")
            have = ", ".join(f"{m.name}:{m.version}" for m, _ in self.list_models()[:20]) or "none"
            what = f"model {shown(name)}" + (f" version {version}" if version else "")
            gone = next((m for m in self._retired if m.name == name and m.version == version), None)
            if gone is not None:
                raise NotFound(f"{what} was removed from the repository (or left the --serve-versions "
                               f"window): it takes no new sessions and only finishes its "
                               f"{self.table.sessions_of(gone)} live ones (loaded: {have})")
            raise NotFound(f"{what} is not loaded (loaded: {have})")
        return mv

    def stats(self, name: str, version: int = 0) -> dict:
        """The batcher's live numbers for a model version (generating rows, last batch size)."""
        return self.batchers[self.model(name, version)].stats()

    # -- input checks ---------------------------------------------------------------------------------
    def _start_state(self, mv: ModelVersion, initial: str, state) -> np.ndarray:
        if initial == "model":
            return mv.initial_state
        if initial == "zeros":
            return np.zeros(mv.state_size, np.float32)
        if initial == "given":
            return inputs.check_state(mv, state if state is not None else [])
        raise InvalidArgument(f"initial must be one of {INITIAL_MODES}, got {initial!r}")

    def _accepting(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down and takes no new work")

    def _claim(self, sid: str) -> Session:
        s = self.table.get(inputs.check_id(sid))
        if s.busy:
            raise FailedPrecondition(f"session {sid} is busy with another request (a feed or a generation)")
        return s

    # -- sessions -------------------------------------------------------------------------------------
    def open(self, name: str, version: int = 0, initial: str = "model",
             state: Sequence[float] | np.ndarray | None = None) -> SessionInfo:
        """Open a new session on a model (version 0 = latest) from its own, zero or a given state."""
        self._accepting()
        mv = self.model(name, version)
        start = self._start_state(mv, initial, state)
        s = self.table.create(mv, start)
        return SessionInfo(s.id, mv, 0, False, self.settings.idle_timeout)

    async def resume(self, session_id: str, wait: float = RESUME_WAIT_S) -> SessionInfo:
        """Find a live session by id (NOT_FOUND says unknown, closed or expired).

        Work still running on it from a stream that went away (a long feed) is waited for, up to `wait`
        seconds, so the step count reported is the true one; past that, FAILED_PRECONDITION says so."""
        self._accepting()
        s = self.table.get(inputs.check_id(session_id))
        if s.busy and not await self.table.wait_idle(s, wait):
            raise FailedPrecondition(f"session {s.id} is still busy after {wait:g} s with work sent on an earlier "
                                     f"stream (a long feed); resume again when it is done")
        s = self.table.get(session_id)  # closed or expired meanwhile: NOT_FOUND
        return SessionInfo(s.id, s.model, s.steps, True, self.settings.idle_timeout)

    def session_model(self, session_id: str) -> ModelVersion:
        """The model version a live session runs on."""
        return self.table.get(inputs.check_id(session_id)).model

    def has_session(self, session_id: str) -> bool:
        """Whether a session with this id is live (no NOT_FOUND, no touch of its idle clock)."""
        return session_id in self.table.live

    async def feed(self, session_id: str, tokens: Sequence[int] | np.ndarray | str,
                   output: str = "last", top_k: int = 0, logits: bool = True) -> FeedResult:
        """Push text or token ids through a session (1 token: a batched step; more: sequence.onnx in slices).

        top_k > 0 also returns the top-k ids and probabilities of each returned step (FeedResult.top),
        computed once for the whole batch. `logits`: whether the caller will send full logits back (with
        top_k, only to size the answer: a feed whose answer could not be sent is refused before it runs)."""
        self._accepting()
        if output not in OUTPUTS:
            raise InvalidArgument(f"output must be one of {OUTPUTS}, got {output!r}")
        s = self._claim(session_id)
        mv = s.model
        top_k = max(0, int(top_k))
        self.check_feed(mv, len(tokens), output, top_k, logits)
        ids = inputs.encode(mv, tokens) if isinstance(tokens, str) else inputs.check_tokens(mv, tokens)
        s.busy = True
        # no shield: a cancelled caller cancels only this future; the batcher still runs the feed to its end
        # and releases the session (FeedJob bookkeeping does not depend on the future)
        logits_out, top = await self.batchers[mv].feed(s, ids, output, top_k)
        return FeedResult(len(ids), logits_out, s.steps, top)

    def check_feed(self, mv: ModelVersion, n: int, output: str = "all", top_k: int = 0, logits: bool = True) -> None:
        """Refuse, before any work, a feed that is empty, too long, too big to answer, or over the budget of
        tokens in flight (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the limit)."""
        if n == 0:
            raise InvalidArgument("feed has no tokens: send text or token ids")
        inputs.check_feed_size(n, self.settings.max_feed_tokens)
        steps_back = {"none": 0, "last": 1, "all": n}[output]
        inputs.check_answer_size(inputs.answer_bytes(steps_back, mv.vocab_size, logits or not top_k, top_k),
                                 self.settings.max_send_bytes, f"the answer to this feed of {n} tokens")
        running, limit = sum(b.inflight_tokens for b in self.batchers.values()), self.settings.max_inflight_tokens
        if running + n > limit:
            raise ResourceExhausted(f"the server is already running {running} feed tokens; {n} more would pass "
                                    f"its limit of {limit} (--max-inflight-tokens): retry shortly")

    async def infer(self, name: str, version: int, tokens: Sequence[int] | np.ndarray,
                    state: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stateless: from the model's initial state (or `state`), logits (n, V) and the final state (S,)."""
        info = self.open(name, version, "model" if state is None else "given", state)
        try:
            out = await self.feed(info.session_id, tokens, "all", logits=True)
            return out.logits, self.get_state(info.session_id).state
        finally:
            self.close(info.session_id)

    async def generate(self, session_id: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                       chunk_tokens: int = 0) -> Generation:
        """Start sampling in the batcher; iterate the result for chunks (validation errors raise here)."""
        self._accepting()
        lim = self.settings.max_generate_tokens
        if max_tokens <= 0:
            raise InvalidArgument("max_tokens must be > 0")
        if max_tokens > lim:
            raise InvalidArgument(f"max_tokens {max_tokens} exceeds this server's limit of {lim} "
                                  "(--max-generate-tokens)")
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
        if not math.isfinite(top_p) or not 0 <= top_p <= 1:
            raise InvalidArgument(f"top_p must be in [0, 1], got {top_p}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
        if any(not st for st in stop):
            raise InvalidArgument("stop strings must not be empty")
        s = self._claim(session_id)
        if not s.has_logits:
            raise FailedPrecondition(f"session {session_id} has no distribution to sample from yet: "
                                     "feed at least one token first")
        row = GenRow(session=s, max_tokens=max_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), rng=np.random.default_rng(seed), stops=tuple(stop),
                     chunk_tokens=chunk_tokens or self.settings.chunk_tokens,
                     maxstop=max((len(x) for x in stop), default=0))
        s.busy = True
        b = self.batchers[s.model]
        gen = Generation(self, b, row)
        self._generations.add(gen)
        b.generate(row)
        return gen

    def reset(self, session_id: str, initial: str = "model",
              state: Sequence[float] | np.ndarray | None = None) -> int:
        """Restart a session from its model's, zero or a given state; forgets the last logits."""
        s = self._claim(session_id)
        s.set_state(self._start_state(s.model, initial, state))
        s.steps = 0
        return 0

    def close(self, session_id: str) -> str:
        """Close a session (its row is freed; the id answers NOT_FOUND 'was closed' afterwards).

        A generation running on it ends at once with reason 'cancelled'."""
        s = self.table.get(inputs.check_id(session_id))
        for g in [g for g in self._generations if g.row.session is s]:
            self.batchers[s.model].end(g.row, "cancelled")
        return self.table.close(session_id).id

    def get_state(self, session_id: str) -> StateView:
        """A copy of a session's state vector."""
        s = self.table.get(inputs.check_id(session_id))
        return StateView(s.id, s.model, s.state, s.steps)

    def set_state(self, session_id: str, state: Sequence[float] | np.ndarray) -> StateView:
        """Overwrite a session's state (import / migrate); its last logits are cleared."""
        s = self._claim(session_id)
        s.set_state(inputs.check_state(s.model, state))
        return StateView(s.id, s.model, s.state, s.steps)
