"""Long feeds in slices: what vLLM calls chunked prefill, for a recurrent model.

A feed of many tokens is not one sequence.onnx call: each batcher iteration runs a slice of every
waiting long feed (round robin, at most the rows the iteration has room for), sized so the slices
together take about `slice_s` of onnxruntime time. Other sessions' steps therefore wait for one slice
at most, however long a feed is, and the memory of a call is bounded by the slice. The cost of a step
for G rows is learnt from the calls themselves (an average per power-of-two G), so the slice adapts to
the model and the machine.

A feed stays atomic for its client: its answer comes when the last slice has run, and if a slice
fails (onnxruntime error, non-finite output, shutdown) the session is put back as it was before the
feed began, its step count unchanged.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import numpy as np

from .clock import StepClock
from .errors import ServeError
from .sampling import top_k as top_k_of
from .sessions import SessionTable, StatePool
from .work import FeedJob

log = logging.getLogger(__name__)

FIRST_SLICE = 8  # tokens per row before any call has been timed
MAX_SLICE = 4096  # tokens per row in one call, whatever the budget


class LongFeeds:
    """The queue of multi-token feeds of one model version and the slices each iteration runs."""

    def __init__(self, pool: StatePool, table: SessionTable, slice_s: float,
                 on_settled: Callable[[int], None] = lambda n: None) -> None:
        self.pool = pool
        self.table = table
        self.slice_s = slice_s
        self.on_settled = on_settled  # called with a feed's length once it has left the queue
        self.jobs: collections.deque[FeedJob] = collections.deque()
        self.clock = StepClock()  # seconds per time step of sequence.onnx, by rows

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: FeedJob) -> None:
        """Queue a feed, remembering the session as it is now (to put back if the feed fails)."""
        p, row = self.pool, job.session.row
        job.before = (p.states[row].copy(), p.logits[row].copy(), bool(p.has_logits[row]))
        self.jobs.append(job)

    # -- schedule ---------------------------------------------------------------------------------------
    def pick(self, room: int) -> list[tuple[list[FeedJob], np.ndarray, np.ndarray]]:
        """This iteration's slices: up to `room` feeds (at least one), round robin, grouped by slice length
        as (jobs, tokens (G, T), states (G, S))."""
        if not self.jobs:
            return []
        g = min(len(self.jobs), max(1, room))
        while g > 1 and (e := self.clock.estimate(g)) is not None and e > self.slice_s:
            g //= 2
        est = self.clock.estimate(g)
        t = FIRST_SLICE if est is None else int(min(MAX_SLICE, max(1, self.slice_s // est)))
        chosen = [self.jobs.popleft() for _ in range(g)]
        self.jobs.extend(chosen)  # to the back: the next iteration serves the others first
        groups: dict[int, list[FeedJob]] = {}
        for j in chosen:
            groups.setdefault(min(t, j.left), []).append(j)
        return [(js, np.stack([j.tokens[j.pos:j.pos + n] for j in js]),  # (G, T)
                 self.pool.states[[j.session.row for j in js]])  # (G, S)
                for n, js in groups.items()]

    # -- update -------------------------------------------------------------------------------------------
    def apply(self, jobs: list[FeedJob], logits: np.ndarray, state: np.ndarray, bad: np.ndarray) -> list[FeedJob]:
        """Write one group's slice results back (rows flagged `bad` excluded); returns the jobs now complete.

        logits (G, T, V), state (G, S), bad (G,) bool."""
        pool, done = self.pool, []
        for i, j in enumerate(jobs):
            if bad[i]:
                continue
            row, n = j.session.row, logits.shape[1]
            pool.states[row] = state[i]
            pool.logits[row] = logits[i, -1]
            pool.has_logits[row] = True
            if j.want == "all":
                j.parts.append(logits[i].copy())  # (T, V)
            elif j.want == "last":
                j.parts = [logits[i, -1:].copy()]  # (1, V)
            j.pos += n
            if j.left == 0:
                done.append(j)
        return done

    def finish(self, j: FeedJob) -> tuple[np.ndarray | None, tuple | None]:
        """A complete feed leaves the queue: its answer (logits per `want`, top-k if asked)."""
        self._remove(j)
        j.session.steps += len(j.tokens)
        self.table.finish_op(j.session)
        if j.want == "none":
            return None, None
        logits = np.concatenate(j.parts) if len(j.parts) > 1 else j.parts[0]  # (n, V) or (1, V)
        return logits, (top_k_of(logits, j.top_k) if j.top_k else None)

    def fail(self, j: FeedJob, error: BaseException) -> None:
        """A feed that cannot complete: the session is put back as before it, the caller gets `error`."""
        self._remove(j)
        if j.before is not None and j.session.row >= 0:
            state, logits, has = j.before
            self.pool.states[j.session.row] = state
            self.pool.logits[j.session.row] = logits
            self.pool.has_logits[j.session.row] = has
        self.table.finish_op(j.session)
        if not j.future.done():
            j.future.set_exception(error)

    def fail_all(self, error: ServeError) -> None:
        """Shutdown: every queued feed fails (its session put back)."""
        for j in list(self.jobs):
            self.fail(j, error)

    def drop_closed(self, error_for) -> None:
        """Feeds whose session was closed meanwhile stop here (nothing to put back: the row is going)."""
        for j in [j for j in self.jobs if j.session.closed]:
            self.fail(j, error_for(j))

    def _remove(self, j: FeedJob) -> None:
        try:
            self.jobs.remove(j)
        except ValueError:
            return
        self.on_settled(len(j.tokens))
