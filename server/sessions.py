"""Live sessions: unguessable ids, states in one stacked array per model version, idle expiry, a cap."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np

from .errors import NotFound, ResourceExhausted, shown
from .repository import ModelVersion

log = logging.getLogger(__name__)

TOMBSTONES = 65536  # how many closed/expired ids we remember, to say which


def _doubled(a: np.ndarray) -> np.ndarray:
    """A zeroed array with twice the rows of `a`, its first half a copy of `a`."""
    out = np.zeros((2 * len(a), *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


class StatePool:
    """All states (and last logits) of one model version in stacked arrays; rows recycled via a free list."""

    def __init__(self, model: ModelVersion, capacity: int = 64) -> None:
        self.model = model
        self.states = np.zeros((capacity, model.state_size), np.float32)  # (C, S)
        self.logits = np.zeros((capacity, model.output_size), np.float32)  # (C, V): a vector model's outputs (C, O)
        self.has_logits = np.zeros(capacity, bool)  # (C,)
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.used = 0

    def alloc(self) -> int:
        """A free row; the arrays double when full."""
        if not self.free:  # double; calloc'd pages stay unmapped until rows are used
            cap = len(self.states)
            self.states, self.logits, self.has_logits = (
                _doubled(self.states), _doubled(self.logits), _doubled(self.has_logits))  # (2C, S), (2C, V), (2C,)
            self.free = list(range(2 * cap - 1, cap - 1, -1))
        self.used += 1
        return self.free.pop()

    def release(self, row: int) -> None:
        """Give a row back (one list append)."""
        self.has_logits[row] = False
        self.free.append(row)
        self.used -= 1


class Attachment:
    """A stream's hold on a session: `ended` gets the reason when the session leaves the stream (resumed on
    another stream, or moved to another replica), and the stream then ends with ABORTED."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def end(self, why: str) -> None:
        """Tell the stream to let go, with why."""
        if not self.ended.done():
            self.ended.set_result(why)


class Session:
    """One client sequence: where its state lives and its bookkeeping (no arrays of its own)."""

    __slots__ = ("_heaped", "_idle", "attached", "busy", "closed", "deadline", "epoch", "id", "model", "origin",
                 "pool", "principal", "protocol", "row", "steps", "watchers")

    def __init__(self, sid: str, pool: StatePool, row: int, principal: str = "") -> None:
        self.id = sid
        self.principal = principal  # who opened it ("" without authentication)
        self.epoch = 0  # its claim in the session store (0: no store)
        self.origin: str | None = None  # how it started ("model", "zeros", "given:<sha256>"), for the prefix cache
        self.protocol = ""  # the protocol of the call that opened (or restored) it, for metrics
        self.attached: Attachment | None = None  # the native stream it is attached to, if any
        self.watchers: set[Attachment] = set()  # KServe streams carrying it (told only when it moves away)
        self.pool = pool
        self.model = pool.model
        self.row = row
        self.steps = 0
        self.deadline = 0.0
        self.busy = False  # an operation (feed, generation) is in flight
        self.closed = False
        self._heaped = False
        self._idle: asyncio.Future | None = None  # set while someone waits for the operation to end

    @property
    def state(self) -> np.ndarray:
        """This session's state vector, a copy: (S,)."""
        return self.pool.states[self.row].copy()

    def set_state(self, vec: np.ndarray) -> None:
        """Overwrite the state and forget the last logits."""
        self.pool.states[self.row] = vec
        self.pool.has_logits[self.row] = False

    @property
    def has_logits(self) -> bool:
        """Whether a step has produced a distribution to sample from."""
        return bool(self.pool.has_logits[self.row])

    @property
    def logits(self) -> np.ndarray | None:
        """The last step's logits, a copy (V,), or None before the first feed."""
        return self.pool.logits[self.row].copy() if self.has_logits else None

    def set_logits(self, logits: np.ndarray | None) -> None:
        """Overwrite the last distribution (None: forget it)."""
        if logits is None:
            self.pool.has_logits[self.row] = False
        else:
            self.pool.logits[self.row] = logits
            self.pool.has_logits[self.row] = True


class SessionTable:
    """Creates, finds, closes and expires sessions; expiry is one timer armed at the earliest deadline.

    `on_change(session, event)` hears of every listed session coming and going: "started" (created here),
    "restored" (adopted from the store), "ended" (closed), "expired" (idle past the timeout), "left" (it lives
    on in another replica)."""

    def __init__(self, max_sessions: int, idle_timeout: float,
                 on_change: Callable[[Session, str], None] | None = None,
                 on_expire: Callable[[Session], None] | None = None,
                 counts: Counter[str] | None = None) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.live: dict[str, Session] = {}
        self.pools: dict[ModelVersion, StatePool] = {}
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (why it is gone, its principal)
        self.counts: Counter[str] = counts if counts is not None else Counter()  # live sessions per principal
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._on_change = on_change or (lambda s, event: None)
        self._on_expire = on_expire or (lambda s: None)

    def __len__(self) -> int:
        return len(self.live)

    def pool(self, model: ModelVersion) -> StatePool:
        """The state pool of a model version (created on first use)."""
        p = self.pools.get(model)
        if p is None:
            p = self.pools[model] = StatePool(model)
        return p

    def create(self, model: ModelVersion, state: np.ndarray, principal: str = "", count: bool = True) -> Session:
        """A new session starting from `state` (S,); RESOURCE_EXHAUSTED past the cap.

        count=False: an ephemeral session (a stateless request) that neither counts against the cap nor
        is listed; the caller closes it with `discard`."""
        if count and len(self.live) >= self.max_sessions:
            raise ResourceExhausted(f"the server holds its maximum of {self.max_sessions} live sessions; "
                                    "close some or try later")
        return self.adopt(secrets.token_urlsafe(16), model, state, principal=principal, listed=count,
                          event="started")  # 128 bits

    def adopt(self, sid: str, model: ModelVersion, state: np.ndarray, logits: np.ndarray | None = None,
              steps: int = 0, principal: str = "", epoch: int = 0, listed: bool = True,
              event: str = "restored") -> Session:
        """Put a session in memory with a given id and content (a new one, or one restored from the store)."""
        pool = self.pool(model)
        row = pool.alloc()
        pool.states[row] = state
        if logits is not None:
            pool.logits[row] = logits
            pool.has_logits[row] = True
        s = Session(sid, pool, row, principal)
        s.steps, s.epoch = steps, epoch
        if listed:
            self.live[sid] = s
            self._gone.pop(sid, None)
            self.counts[principal] += 1
            self.touch(s)
            self._on_change(s, event)
        return s

    def discard(self, s: Session) -> None:
        """Free an ephemeral session (one created with count=False)."""
        s.closed = True
        if not s.busy and s.row >= 0:
            s.pool.release(s.row)
            s.row = -1

    def forget(self, s: Session) -> None:
        """Let a session go from memory without a tombstone (it lives on elsewhere: another replica has it)."""
        if self.live.pop(s.id, None) is not None:
            self._uncount(s)
            self._on_change(s, "left")
        s.closed = True
        if not s.busy and s.row >= 0:
            s.pool.release(s.row)
            s.row = -1

    def get(self, sid: str, principal: str | None = None) -> Session:
        """The live session with this id, or NOT_FOUND saying whether it was closed, expired or never seen.

        With `principal`, a session of another principal is NOT_FOUND in exactly the words of an id never
        seen (no oracle), and so is its tombstone."""
        s = self.live.get(sid)
        if s is not None and (principal is None or s.principal == principal):
            self.touch(s)
            return s
        why = self.gone_reason(sid, principal)
        if why is not None and s is None:
            raise NotFound(f"session {sid} {why}")
        raise self.unknown(sid)

    @staticmethod
    def unknown(sid: str) -> NotFound:
        """The NOT_FOUND of an id this server does not know (also what another principal's id gets)."""
        return NotFound(f"session {shown(sid)} is unknown (never opened here, or forgotten)")

    def gone_reason(self, sid: str, principal: str | None = None) -> str | None:
        """Why a session id is gone ("was closed", "expired after ..."), if remembered (and its principal's)."""
        entry = self._gone.get(sid)
        if entry is None or (principal is not None and entry[1] != principal):
            return None
        return entry[0]

    def close(self, sid: str) -> Session:
        """Close a session: its row is freed now, or when its in-flight operation ends."""
        s = self.get(sid)
        self._drop(s, "was closed", "ended")
        return s

    def finish_op(self, s: Session) -> None:
        """An operation on `s` ended: release its row if it was closed meanwhile, restart its idle clock."""
        s.busy = False
        if s.closed:
            if s.row >= 0:
                s.pool.release(s.row)
                s.row = -1
        else:
            self.touch(s)
        if s._idle is not None:
            if not s._idle.done():
                s._idle.set_result(None)
            s._idle = None

    async def wait_idle(self, s: Session, timeout: float) -> bool:
        """Wait until the operation running on `s` ends (True), or `timeout` seconds pass (False)."""
        if not s.busy:
            return True
        if s._idle is None:
            s._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(s._idle), timeout)
        except TimeoutError:
            return False
        return True

    def _uncount(self, s: Session) -> None:
        self.counts[s.principal] -= 1
        if self.counts[s.principal] <= 0:
            del self.counts[s.principal]

    def _drop(self, s: Session, why: str, event: str) -> None:
        if self.live.pop(s.id, None) is not None:
            self._uncount(s)
            self._on_change(s, event)
        s.closed = True
        self._gone[s.id] = (why, s.principal)
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if not s.busy and s.row >= 0:
            s.pool.release(s.row)
            s.row = -1

    def sessions_of(self, model: ModelVersion) -> int:
        """How many live sessions use this version (for draining a removed version)."""
        p = self.pools.get(model)
        return p.used if p else 0

    # -- idle expiry: a heap of deadlines, one timer for the earliest, re-armed on change --------------
    def touch(self, s: Session) -> None:
        """Restart the idle clock; the heap entry is lazily refreshed when its old deadline comes."""
        if self.idle_timeout <= 0:
            return
        s.deadline = time.monotonic() + self.idle_timeout
        if not s._heaped:
            s._heaped = True
            heapq.heappush(self._heap, (s.deadline, next(self._seq), s))
            if self._heap[0][2] is s:
                self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._heap:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet; armed by the next touch inside the loop
        delay = max(0.0, self._heap[0][0] - time.monotonic())
        self._timer = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        expired = 0
        while self._heap and self._heap[0][0] <= now:
            _, _, s = heapq.heappop(self._heap)
            s._heaped = False
            if s.closed:
                continue
            if s.busy:  # generating or stepping: not idle
                s.deadline = now + self.idle_timeout
            if s.deadline > now:
                s._heaped = True
                heapq.heappush(self._heap, (s.deadline, next(self._seq), s))
                continue
            self._drop(s, f"expired after {self.idle_timeout:g} s idle", "expired")
            self._on_expire(s)
            expired += 1
        if expired:
            log.info("expired %d idle session(s)", expired)
        self._arm()

    def stop(self) -> None:
        """Cancel the expiry timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
