"""Live sessions: unguessable ids, states in one stacked array per model version, idle expiry, a cap."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import secrets
import time
from collections import OrderedDict
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
        self.logits = np.zeros((capacity, model.vocab_size), np.float32)  # (C, V)
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


class Session:
    """One client sequence: where its state lives and its bookkeeping (no arrays of its own)."""

    __slots__ = ("_heaped", "_idle", "busy", "closed", "deadline", "id", "model", "pool", "row", "steps")

    def __init__(self, sid: str, pool: StatePool, row: int) -> None:
        self.id = sid
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


class SessionTable:
    """Creates, finds, closes and expires sessions; expiry is one timer armed at the earliest deadline."""

    def __init__(self, max_sessions: int, idle_timeout: float,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.live: dict[str, Session] = {}
        self.pools: dict[ModelVersion, StatePool] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._on_change = on_change or (lambda n: None)

    def __len__(self) -> int:
        return len(self.live)

    def pool(self, model: ModelVersion) -> StatePool:
        """The state pool of a model version (created on first use)."""
        p = self.pools.get(model)
        if p is None:
            p = self.pools[model] = StatePool(model)
        return p

    def create(self, model: ModelVersion, state: np.ndarray) -> Session:
        """A new session starting from `state` (S,); RESOURCE_EXHAUSTED past the cap."""
        if len(self.live) >= self.max_sessions:
            raise ResourceExhausted(f"the server holds its maximum of {self.max_sessions} live sessions; "
                                    "close some or try later")
        pool = self.pool(model)
        row = pool.alloc()
        pool.states[row] = state
        sid = secrets.token_urlsafe(16)  # 128 random bits
        s = Session(sid, pool, row)
        self.live[sid] = s
        self.touch(s)
        self._on_change(len(self.live))
        return s

    def get(self, sid: str) -> Session:
        """The live session with this id, or NOT_FOUND saying whether it was closed, expired or never seen."""
        s = self.live.get(sid)
        if s is not None:
            self.touch(s)
            return s
        why = self._gone.get(sid)
        if why is not None:
            raise NotFound(f"session {sid} {why}")
        raise NotFound(f"session {shown(sid)} is unknown (never opened here, or forgotten)")

    def close(self, sid: str) -> Session:
        """Close a session: its row is freed now, or when its in-flight operation ends."""
        s = self.get(sid)
        self._drop(s, "was closed")
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

    def _drop(self, s: Session, why: str) -> None:
        self.live.pop(s.id, None)
        s.closed = True
        self._gone[s.id] = why
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        if not s.busy and s.row >= 0:
            s.pool.release(s.row)
            s.row = -1
        self._on_change(len(self.live))

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
            self._drop(s, f"expired after {self.idle_timeout:g} s idle")
            expired += 1
        if expired:
            log.info("expired %d idle session(s)", expired)
        self._arm()

    def stop(self) -> None:
        """Cancel the expiry timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
