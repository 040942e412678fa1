"""The serving engine: the one narrow API both servicers (native and KServe v2) call.

Every method raises a server.errors.ServeError subclass for anything the client did wrong
(its `.code` is the gRPC status to answer with). Models and batchers (models.py), sessions in
memory (sessions.py) and in the store (keeper.py), and onnxruntime all stay behind it.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence

import numpy as np

from . import auth, inputs
from .batcher import Batcher
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from .keeper import Keeper
from .models import Models
from .quotas import Quotas
from .repository import ModelVersion, Repository
from .runner import Generation, Runner
from .sessions import Attachment, Session, SessionTable
from .settings import Settings, parse_policy
from .store import open_store
from .work import FeedResult, SessionInfo, StateView

log = logging.getLogger(__name__)

RESUME_WAIT_S = 10.0  # how long a resume waits for work still running from an earlier stream
OUTPUTS = ("none", "last", "all")


class Engine:
    """Sessions and their work: open, resume, feed, generate, state; the models and the store behind."""

    def __init__(self, settings: Settings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = open_store(settings.session_store, settings.state_dir, settings.replica_id)
        self.keeper: Keeper | None = None
        self.quotas = Quotas()
        self.table = SessionTable(settings.max_sessions, settings.idle_timeout,
                                  on_change=(metrics.live_sessions if metrics else None), on_expire=self._expired,
                                  counts=self.quotas.sessions)
        self.models = Models(settings, self.table, metrics, on_stepped=self._stepped)
        if self.store is not None:
            self.keeper = Keeper(self.store, self.table, parse_policy(settings.state_sync), settings.idle_timeout,
                                 self.models.get, self._stop_work)
        self.runner = Runner(settings, self.models, self.table, self.quotas, self._stepped, metrics)
        self.draining = False

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models and connect the session store."""
        await self.models.start()
        if self.keeper is not None:
            await self.keeper.start()
            log.info("sessions are kept in %s (replica %s, --state-sync %s)", self.store.where, self.store.replica,
                     self.settings.state_sync)

    @property
    def repo(self) -> Repository | None:
        """The model repository (for tests and the App's log line)."""
        return self.models.repo

    @property
    def batchers(self) -> dict[ModelVersion, Batcher]:
        """One batcher per loaded version."""
        return self.models.batchers

    @property
    def on_models_changed(self) -> list:
        """Async callables run after a repository scan changed what is served."""
        return self.models.on_changed

    async def refresh(self) -> None:
        """Rescan the model repository now."""
        await self.models.refresh()

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
        pending = [g.finished for g in self.runner.generations]
        pending += [j.future for b in self.batchers.values() for j in b.long.jobs]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for b in self.batchers.values():
            b.cut_all()

    async def stop(self, started: bool = True) -> None:
        """Write every session to the store (if any, and if it was reached), then stop batchers and timers."""
        if self.keeper is not None and started:
            await self.keeper.stop()
        self.table.stop()
        await self.models.stop()

    # -- models ---------------------------------------------------------------------------------------
    def list_models(self) -> list[tuple[ModelVersion, bool]]:
        """Every loaded version with whether it is the latest (the default) of its model."""
        return self.models.list()

    def is_latest(self, mv: ModelVersion) -> bool:
        """Whether this version is the one new sessions of its model get (the default)."""
        return self.models.is_latest(mv)

    def versions(self, name: str) -> list[int]:
        """The loaded versions of one model, ascending."""
        return [mv.version for mv, _ in self.list_models() if mv.name == name]

    def model(self, name: str, version: int = 0) -> ModelVersion:
        """A loaded model version (0 = latest); NOT_FOUND naming what exists."""
        return self.models.get(name, version)

    def stats(self, name: str, version: int = 0) -> dict:
        """The batcher's live numbers for a model version (generating rows, last batch size)."""
        return self.batchers[self.model(name, version)].stats()

    # -- sessions: lookup ---------------------------------------------------------------------------------
    def _accepting(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down and takes no new work")

    async def _session(self, sid: str) -> Session:
        """A live session by id: in memory, or restored (or taken over) from the store."""
        inputs.check_id(sid)
        who = auth.current.get().name
        if self.keeper is None:
            return self.table.get(sid, who)
        for _ in range(3):
            s = await self.keeper.get(sid, who)
            if s.principal != who:  # another principal's: exactly as if it did not exist
                raise self.table.unknown(sid)
            if not s.closed:
                return s
            self.table.gone_reason(sid, who) and self.table.get(sid, who)  # closed meanwhile: NOT_FOUND saying so
        raise Unavailable(f"session {sid} is moving between replicas; try again")

    async def _claim(self, sid: str) -> Session:
        s = await self._session(sid)
        if s.busy:
            raise FailedPrecondition(f"session {sid} is busy with another request (a feed or a generation)")
        return s

    def _stepped(self, sessions: list[Session]) -> None:
        if self.keeper is not None:
            self.keeper.changed(sessions)

    def _expired(self, s: Session) -> None:
        if self.keeper is not None:
            self.keeper.expired(s)

    def _stop_work(self, s: Session) -> None:
        for g in [g for g in self.runner.generations if g.row.session is s]:
            self.batchers[s.model].end(g.row, "cancelled")

    # -- sessions -------------------------------------------------------------------------------------
    async def open(self, name: str, version: int = 0, initial: str = "model",
                   state: Sequence[float] | np.ndarray | None = None) -> SessionInfo:
        """Open a new session on a model (version 0 = latest) from its own, zero or a given state; it belongs
        to the calling principal."""
        self._accepting()
        mv = self.model(name, version)
        start = inputs.start_state(mv, initial, state)
        s = await self._new_session(mv, start)
        s.origin = initial if initial != "given" else "given:" + hashlib.sha256(start.tobytes()).hexdigest()
        return SessionInfo(s.id, mv, 0, False, self.settings.idle_timeout)

    async def fork(self, session_id: str) -> SessionInfo:
        """A new session with the same state, last distribution and step count (one row copy), the caller's."""
        self._accepting()
        src = await self._claim(session_id)
        s = await self._new_session(src.model, src.state, src.logits, src.steps)
        s.origin = src.origin if src.steps == 0 else None
        return SessionInfo(s.id, s.model, s.steps, False, self.settings.idle_timeout)

    async def _new_session(self, mv: ModelVersion, state: np.ndarray, logits: np.ndarray | None = None,
                           steps: int = 0) -> Session:
        """A session of the calling principal, within its quota and --max-sessions, written to the store."""
        who = auth.current.get()
        self.quotas.check_open(who)
        if self.keeper is not None and await self.keeper.count() >= self.settings.max_sessions:
            raise ResourceExhausted(f"the service holds its maximum of {self.settings.max_sessions} sessions "
                                    "(--max-sessions, counted in the session store); close some or try later")
        s = self.table.create(mv, state, who.name)
        s.set_logits(logits)
        s.steps = steps
        if self.keeper is not None:
            try:
                await self.keeper.created(s)
            except BaseException:
                self.table.close(s.id)
                raise
        return s

    async def resume(self, session_id: str, wait: float = RESUME_WAIT_S) -> SessionInfo:
        """Find a session by id (NOT_FOUND says unknown, closed or expired), restored or taken over if need be.

        Work still running on it from a stream that went away (a long feed) is waited for, up to `wait`
        seconds, so the step count reported is the true one; past that, FAILED_PRECONDITION says so."""
        self._accepting()
        s = await self._session(session_id)
        if s.busy and not await self.table.wait_idle(s, wait):
            raise FailedPrecondition(f"session {s.id} is still busy after {wait:g} s with work sent on an earlier "
                                     f"stream (a long feed); resume again when it is done")
        s = await self._session(session_id)  # closed, expired or moved meanwhile: looked up again
        return SessionInfo(s.id, s.model, s.steps, True, self.settings.idle_timeout)

    def attach(self, session_id: str) -> Attachment:
        """A stream takes hold of a session; a stream that held it before is told to let go."""
        s = self.table.live[session_id]
        if s.attached is not None:
            s.attached.end("the session was resumed on another stream")
        s.attached = Attachment()
        return s.attached

    def watch(self, session_id: str) -> Attachment | None:
        """A KServe stream carries a session: it is told (and ends) if the session moves to another replica."""
        s = self.table.live.get(session_id)
        if s is None:
            return None
        hold = Attachment()
        s.watchers.add(hold)
        return hold

    def unwatch(self, session_id: str, hold: Attachment) -> None:
        """The stream is done with the session."""
        s = self.table.live.get(session_id)
        if s is not None:
            s.watchers.discard(hold)

    def detach(self, session_id: str, attachment: Attachment) -> None:
        """A stream let go of a session (it ended): written to the store per --state-sync (in the background)."""
        s = self.table.live.get(session_id)
        if s is None or s.attached is not attachment:
            return
        s.attached = None
        if self.keeper is not None:
            self.keeper.detached(s)

    async def session_model(self, session_id: str) -> ModelVersion:
        """The model version a session runs on."""
        return (await self._session(session_id)).model

    def gone_reason(self, session_id: str) -> str | None:
        """Why a session id of the caller's is gone here ("was closed", "expired after ..."), if remembered."""
        return self.table.gone_reason(session_id, auth.current.get().name)

    async def alias(self, key: str) -> str | None:
        """The session an alias (a KServe sequence id) names in the shared store, if any."""
        if self.keeper is None:
            return None
        return await self.keeper.guard(self.store.get_alias(key))

    async def set_alias(self, key: str, session_id: str) -> None:
        """Point an alias at a session in the store (no-op without a store)."""
        if self.keeper is not None:
            await self.keeper.guard(self.store.set_alias(key, session_id, self.settings.idle_timeout))

    async def del_alias(self, key: str, session_id: str) -> None:
        """Remove an alias from the store if it still names the session."""
        if self.keeper is not None:
            await self.keeper.guard(self.store.del_alias(key, session_id))

    def has_session(self, session_id: str) -> bool:
        """Whether a session with this id is in memory here (no store lookup, no touch of its idle clock)."""
        return session_id in self.table.live

    async def feed(self, session_id: str, tokens: Sequence[int] | np.ndarray | str,
                   output: str = "last", top_k: int = 0, logits: bool = True, horizon: int = 0) -> FeedResult:
        """Push text or token ids through a session (1 token: a batched step; more: sequence.onnx in slices).

        top_k > 0 also returns the top-k ids and probabilities of each returned step; `logits`: whether the
        caller sends full logits back (to size the answer: one that could not be sent is refused up front)."""
        self._accepting()
        if output not in OUTPUTS:
            raise InvalidArgument(f"output must be one of {OUTPUTS}, got {output!r}")
        return await self.runner.feed(await self._claim(session_id), tokens, output, top_k, logits, horizon)

    async def forecast(self, session_id: str, horizon: int) -> np.ndarray:
        """A forecaster's next `horizon` steps (H, O) after the session's last frame, fed back one at a time;
        the session's own state does not move (vector models whose task is forecast only)."""
        self._accepting()
        return await self.runner.forecast(await self._claim(session_id), int(horizon))

    def check_feed(self, mv: ModelVersion, n: int, output: str = "all", top_k: int = 0, logits: bool = True,
                   horizon: int = 0) -> None:
        """Refuse, before any work, a feed that is empty, too long, too big to answer or over the budget (or
        whose forecast horizon does not fit the model)."""
        self.runner.check_feed(mv, n, output, top_k, logits)
        if horizon:
            self.runner.check_horizon(mv, horizon)

    async def infer(self, name: str, version: int, tokens: Sequence[int] | np.ndarray,
                    state: Sequence[float] | np.ndarray | None = None, horizon: int = 0,
                    with_forecast: bool = False) -> tuple:
        """Stateless: from the model's initial state (or `state`), logits (n, V) and the final state (S,)
        (and, with_forecast, a forecaster's rollout (H, O) after them, None when horizon is 0)."""
        self._accepting()
        out = await self.runner.infer(self.model(name, version), tokens, state, horizon)
        return out if with_forecast else out[:2]

    async def generate(self, session_id: str, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                       chunk_tokens: int = 0) -> Generation:
        """Start sampling in the batcher; iterate the result for chunks (validation errors raise here)."""
        self._accepting()
        inputs.check_generation(max_tokens, self.settings.max_generate_tokens, temperature, top_p, top_k, stop)
        s = await self._claim(session_id)
        return self.runner.generate(s, max_tokens, temperature, top_k, top_p, seed, stop, chunk_tokens)

    async def reset(self, session_id: str, initial: str = "model",
                    state: Sequence[float] | np.ndarray | None = None) -> int:
        """Restart a session from its model's, zero or a given state; forgets the last logits."""
        s = await self._claim(session_id)
        s.set_state(inputs.start_state(s.model, initial, state))
        s.steps = 0
        self._stepped([s])
        return 0

    async def close(self, session_id: str) -> str:
        """Close a session (its row is freed; the id answers NOT_FOUND 'was closed' afterwards).

        A generation running on it ends at once with reason 'cancelled'."""
        s = await self._session(session_id)
        self._stop_work(s)
        self.table.close(s.id)
        if self.keeper is not None:
            await self.keeper.closed(s)
        return s.id

    async def get_state(self, session_id: str) -> StateView:
        """A copy of a session's state vector, step count and last logits."""
        s = await self._session(session_id)
        return StateView(s.id, s.model, s.state, s.steps, s.logits)

    async def set_state(self, session_id: str, state: Sequence[float] | np.ndarray,
                        logits: Sequence[float] | np.ndarray | None = None, steps: int | None = None) -> StateView:
        """Overwrite a session's state (import / migrate). Its last logits are cleared, or set to `logits`
        (so it can generate at once), and its step count is kept, or set to `steps`."""
        s = await self._claim(session_id)
        vec = inputs.check_state(s.model, state)
        dist = None if logits is None else inputs.check_logits(s.model, logits)
        s.set_state(vec)
        s.set_logits(dist)
        if steps is not None:
            s.steps = int(steps)
        self._stepped([s])
        return StateView(s.id, s.model, s.state, s.steps, s.logits)

    # -- model control (the KServe repository extension; server/models.py) ------------------------------
    def repository_name(self) -> str:
        """The model repository's name as the repository RPCs use it: its folder's name."""
        return self.settings.models.resolve().name

    def repository_index(self, ready_only: bool = False) -> list:
        """Every model folder and loaded version with its state and why (models.IndexEntry rows)."""
        return self.models.index(ready_only)

    async def load_model(self, name: str) -> ModelVersion:
        """Load (or reload) a model from the repository; returns its default version once it is served."""
        self._accepting()
        return await self.models.load(name)

    async def unload_model(self, name: str) -> int:
        """Unload every version of a model (explicit model control); returns how many."""
        self._accepting()
        return await self.models.unload(name)
