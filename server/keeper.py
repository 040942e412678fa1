"""The session keeper: writes sessions to the store as --state-sync says, restores them on first use,
and hands them over between replicas without split brain.

- Write policies: `step` writes the sessions each batcher iteration moved on (write-behind: answers
  are not held back, so a kill -9 loses at most the writes still queued); `<N>ms` writes the sessions
  changed in the last N ms (a kill loses at most N ms of steps); `detach` writes a session when its
  stream ends, and every session on shutdown. SIGTERM always writes and releases every session.
- Restore: a session not in memory is claimed from the store on first use (no scan at start, so a
  restart with 100k sessions in the store starts at once).
- Hand-over: a replica asked to release a session ends its generation, waits for the step under way,
  writes it, releases it (so the asker's claim succeeds at once) and ends the session's stream with
  ABORTED. A write refused for a stale epoch means another replica took the session: it leaves memory here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .errors import Aborted, FailedPrecondition, NotFound, ServeError, Unavailable
from .repository import ModelVersion
from .sessions import Session, SessionTable
from .store import Record, RecordError, SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

MOVED = "session moved to another replica"
TAKEOVER_WAIT_S = 5.0  # how long a claim waits for a live holder to hand a session over
HANDOVER_IDLE_S = 5.0  # how long a holder waits for the step under way before it releases anyway
COUNT_EVERY_S = 5.0  # how stale the count of a private store may be
ASK_AGAIN_S = 0.5  # a release request is fire-and-forget: repeat it while the holder still holds on


class Keeper:
    """Between the session table (memory) and the session store."""

    def __init__(self, store: SessionStore, table: SessionTable, policy: float | str, idle_timeout: float,
                 model_of: Callable[[str, int], ModelVersion], stop_work: Callable[[Session], None]) -> None:
        self.store = store
        self.table = table
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.model_of = model_of  # (name, version) -> a loaded version, NotFound otherwise
        self.stop_work = stop_work  # end a session's generation now (a hand-over)
        self.dirty: set[Session] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # id -> (lock, how many hold or wait)
        self._flusher: asyncio.Task | None = None
        self.writes = 0  # records written (for the benches)
        self._count, self._counted_at = 0, -COUNT_EVERY_S  # sessions in a private store, and when counted

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the store and start the write-behind task."""
        await self.store.start(self._release_requested)
        if self.policy != "detach":
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="session-writer")

    async def stop(self) -> None:
        """Shutdown: write the sessions changed since their last write, release every one in a batch, disconnect."""
        if self._flusher is not None:
            self._flusher.cancel()
        held = list(self.table.live.values())
        dirty = [s for s in self.dirty if not s.closed]
        try:
            refused = await self.store.save([(self.record(s), s.epoch) for s in dirty]) if dirty else []
            await self.store.release_all([(s.id, s.epoch) for s in held if s.id not in refused])
            log.info("wrote %d changed session(s) and released %d to %s", len(dirty) - len(refused),
                     len(held) - len(refused), self.store.where)
        except StoreUnavailable as e:
            log.error("could not write %d session(s) at shutdown: %s", len(dirty), e)
        for t in list(self._tasks):
            t.cancel()
        await self.store.close()

    async def count(self) -> int:
        """Sessions in the store (for --max-sessions across restarts and replicas): asked of a shared store
        each time; a private one is counted at most every COUNT_EVERY_S seconds, kept up to date between."""
        if self.store.shared:
            return await self.guard(self.store.count())
        now = time.monotonic()
        if now - self._counted_at > COUNT_EVERY_S:
            self._counted_at = now  # before the await: the requests meanwhile use the count we have
            self._count = await self.guard(self.store.count())
        return max(self._count, len(self.table.live))

    # -- records ---------------------------------------------------------------------------------------------
    def record(self, s: Session) -> Record:
        """A snapshot of a session as the store keeps it."""
        return Record(s.id, s.model.name, s.model.version, s.state, s.logits, s.steps, s.principal,
                      self.idle_timeout, time.time())

    async def created(self, s: Session) -> None:
        """A new session: written at once, held by this replica."""
        s.epoch = await self.guard(self.store.create(self.record(s)))
        self._count += 1

    async def closed(self, s: Session) -> None:
        """A session closed or expired: gone from the store too."""
        self.dirty.discard(s)
        self._count -= 1
        try:
            await self.store.delete(s.id, s.epoch)
        except StoreUnavailable as e:
            log.warning("could not delete session %s from the store (it will expire there): %s", s.id, e)

    def expired(self, s: Session) -> None:
        """The table expired a session (sync callback): delete it in the background."""
        self._spawn(self.closed(s))

    def changed(self, sessions: list[Session]) -> None:
        """Sessions whose state moved on (a batch, a reset, an import): written per the policy (and at stop)."""
        self.dirty.update(sessions)
        if self.policy == "step":
            self._wake.set()

    def detached(self, s: Session) -> None:
        """A stream let go of a session: with the detach policy it is written now (in the background)."""
        if self.policy == "detach" and not s.closed and s in self.dirty:
            self.dirty.discard(s)
            self._spawn(self._write([s]))

    async def _flush_loop(self) -> None:
        while True:
            if self.policy == "step":
                await self._wake.wait()
                self._wake.clear()
            else:
                await asyncio.sleep(float(self.policy))
            if self.dirty:
                batch, self.dirty = [s for s in self.dirty if not s.closed], set()
                try:
                    await self._write(batch)
                except StoreUnavailable as e:
                    log.warning("session writes failing (%d pending, retried): %s", len(batch), e)
                    self.dirty.update(s for s in batch if not s.closed)
                    await asyncio.sleep(0.5)

    async def _write(self, sessions: list[Session]) -> None:
        if not sessions:
            return
        refused = await self.store.save([(self.record(s), s.epoch) for s in sessions])
        self.writes += len(sessions)
        for sid in refused:
            s = self.table.live.get(sid)
            if s is not None:
                log.warning("session %s was taken over by another replica (its epoch moved on): dropped here", sid)
                self._let_go(s, MOVED)

    # -- restore and take-over ---------------------------------------------------------------------------------
    async def get(self, sid: str, principal: str | None = None) -> Session:
        """The session, from memory or claimed from the store (taken over from a live holder if need be).

        Claims, restores and hand-overs of one id take turns on a per-id lock; a session in memory with no
        transition under way and a live lease is returned without waiting."""
        s = self.table.live.get(sid)
        if s is not None and sid not in self._locks and self.store.lease_ok():
            self.table.touch(s)
            return s
        async with self._lock(sid):
            s = self.table.live.get(sid)
            if s is not None:
                if not self.store.lease_ok():  # our heartbeat may have lapsed: make sure nobody took it meanwhile
                    await self._verify(s)
                self.table.touch(s)
                return s
            if self.table.gone_reason(sid, principal) is not None:  # closed or expired here: the table says which
                return self.table.get(sid, principal)
            return await self._restore(sid, principal)

    @contextlib.asynccontextmanager
    async def _lock(self, sid: str):
        """One transition of a session id at a time (restore, verify, hand-over)."""
        lock, waiting = self._locks.setdefault(sid, (asyncio.Lock(), [0]))
        waiting[0] += 1
        try:
            async with lock:
                yield
        finally:
            waiting[0] -= 1
            if not waiting[0]:
                del self._locks[sid]

    async def _restore(self, sid: str, principal: str | None) -> Session:
        end = time.monotonic() + TAKEOVER_WAIT_S
        asked, asked_at, pause = "", 0.0, 0.002
        while True:
            claim = await self.guard(self.store.claim(sid))
            if claim.epoch:
                return self._adopt(sid, claim.record, claim.epoch)
            if not claim.found:
                return self.table.get(sid, principal)  # NOT_FOUND: never opened, closed or expired
            if claim.holder != asked or time.monotonic() > asked_at + ASK_AGAIN_S:  # requests are not queued
                await self.guard(self.store.ask_release(sid, claim.holder))
                asked, asked_at = claim.holder, time.monotonic()
            if time.monotonic() > end:
                raise Unavailable(f"session {sid} is held by replica {claim.holder}, which did not hand it over "
                                  f"within {TAKEOVER_WAIT_S:g} s; try again")
            await asyncio.sleep(pause)
            pause = min(0.02, pause * 1.5)

    async def _verify(self, s: Session) -> None:
        """Claim a session held in memory again: if no other replica claimed it since ours (the epoch moved
        on by exactly one) it stays as it is, else the newer holder's state wins (no split brain)."""
        claim = await self.guard(self.store.claim(s.id))
        if claim.epoch == s.epoch + 1:
            s.epoch = claim.epoch
            return
        self._let_go(s, MOVED)
        if claim.epoch:
            self._adopt(s.id, claim.record, claim.epoch)
        elif claim.found:
            await self.store.ask_release(s.id, claim.holder)
        raise Aborted(f"session {s.id} was taken over by another replica while this one was out of touch; "
                      "resume it to continue from its newest state")

    def _adopt(self, sid: str, rec: Record, epoch: int) -> Session:
        try:
            mv = self.model_of(rec.model, rec.version)
        except NotFound:
            self._spawn(self.store.release(sid, epoch))
            raise FailedPrecondition(f"session {sid} runs on model {rec.model} version {rec.version}, which this "
                                     "server does not serve") from None
        s = self.table.adopt(sid, mv, rec.state, rec.logits, rec.steps, rec.principal, epoch)
        log.debug("restored session %s (epoch %d, %d steps)", sid, epoch, rec.steps)
        return s

    def _release_requested(self, sid: str) -> None:
        self._spawn(self._hand_over(sid))

    async def _hand_over(self, sid: str) -> None:
        """Another replica wants this session: end its generation, let the step under way finish, write it,
        release it and let go, all under the id's lock (a local request waits, then claims it back)."""
        async with self._lock(sid):
            s = self.table.live.get(sid)
            if s is None:
                claim = await self.store.claim(sid)  # ours in the store only (an earlier life of this replica)
                if claim.epoch:
                    await self.store.release(sid, claim.epoch)
                return
            self.stop_work(s)
            end = time.monotonic() + HANDOVER_IDLE_S
            while s.busy and await self.table.wait_idle(s, max(0.0, end - time.monotonic())):
                pass  # another request may have started while we were woken: wait for it too
            if s.busy:
                log.warning("session %s still busy after %.0f s: released with its last written state", sid,
                            HANDOVER_IDLE_S)
                await self.store.release(sid, s.epoch)
            elif sid in self.table.live:
                await self.store.release(sid, s.epoch, self.record(s))
            self._let_go(s, MOVED)

    def _let_go(self, s: Session, why: str) -> None:
        """The session now lives elsewhere: out of memory here, its stream told."""
        self.dirty.discard(s)
        self.table.forget(s)
        for hold in [s.attached, *s.watchers]:
            if hold is not None:
                hold.end(why)
        s.watchers.clear()

    # -- helpers ---------------------------------------------------------------------------------------------------
    async def guard(self, aw):
        """Await a store call; its failures as the errors a client gets (UNAVAILABLE, FAILED_PRECONDITION)."""
        try:
            return await aw
        except StoreUnavailable as e:
            raise Unavailable(f"the session store is unavailable: {e}") from None
        except RecordError as e:  # damaged, or written by a newer rnnserve: refused, never misread
            raise FailedPrecondition(f"a stored session cannot be read here: {e}") from None

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            e = t.exception()
            if isinstance(e, (StoreUnavailable, ServeError)):
                log.warning("session store task failed: %s", e)
            else:
                log.error("session store task failed", exc_info=e)
