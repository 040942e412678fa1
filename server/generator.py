"""The generating rows of one model version: admission, sampling, chunks, finishing, in one of two ways.

With a generation graph (generate.onnx, K steps with sampling inside one onnxruntime call) a row is
given K tokens per iteration: K is 1 for a row's first chunk (time to first token), else what the rows
still need up to their chunk size, within a time budget learnt from the calls. A stop string met inside
a chunk ends the row there: its state is recomputed with sequence.onnx from the chunk's start state over
the tokens up to the stop, so it is exactly what it would be had generation stopped there. Without the
graph (versions exported before it) a row samples one token in numpy and rides the step call.
Either way the same uniforms of the row's seeded generator are used, one per token, so a seed fixes the
text.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from .clock import StepClock
from .repository import ModelVersion
from .sampling import sample
from .sessions import Session, SessionTable, StatePool
from .work import Chunk, GenRow

log = logging.getLogger(__name__)


class Generator:
    """New and running generations of one version; the batcher calls it in each iteration's phases."""

    def __init__(self, model: ModelVersion, pool: StatePool, table: SessionTable, budget_s: float,
                 gauge: Callable[[int], None]) -> None:
        self.model = model
        self.pool = pool
        self.table = table
        self.graph = model.generate is not None  # K tokens per call in generate.onnx, else one per step
        self.budget_s = budget_s  # how long one generation call may take (others' steps wait for it)
        self.gauge = gauge
        self.new: list[GenRow] = []
        self._new_since = 0.0  # when the oldest row in `new` arrived (perf_counter; 0: none)
        self.admitted_at = 0.0  # the arrival of the oldest row the last admit() took (the batcher's queue time)
        self.rows: dict[GenRow, None] = {}  # insertion-ordered set of running rows
        self.inflight: set[GenRow] = set()
        self.clock = StepClock()  # seconds per generated step by rows (graph path)

    def __len__(self) -> int:
        return len(self.rows) + len(self.new)

    def add(self, row: GenRow) -> None:
        """A new generation; its first token comes from the session's last logits."""
        if not self.new:
            self._new_since = time.perf_counter()
        self.new.append(row)

    def admit(self) -> None:
        """New rows join the running ones (on the step path their first token is sampled now)."""
        rows, self.new = self.new, []
        if rows:
            self.admitted_at, self._new_since = self._new_since, 0.0
        if not self.graph and rows:
            self._sample(rows, self.pool.logits[[r.session.row for r in rows]])  # (R, V)
        for r in rows:
            if not r.cancelled:
                self.rows[r] = None
        self.gauge(len(self))

    def pick(self, room: int) -> list[GenRow]:
        """This iteration's rows, at most `room`; when more run, they take turns."""
        rows = list(self.rows)
        if len(rows) > room:
            for r in rows[:room]:
                self.rows.pop(r)
                self.rows[r] = None
            rows = rows[:room]
        return rows

    # -- the graph path ----------------------------------------------------------------------------------------
    def graph_inputs(self, rows: list[GenRow]) -> dict[str, np.ndarray]:
        """generate.onnx's inputs for these rows: K from what they need, the chunk size and the time budget."""
        if any(not r.emitted for r in rows):
            k = 1  # a first chunk goes out after one token (the batcher gives new rows a call of their own)
        else:
            k = min(min(r.chunk_tokens, r.max_tokens - r.produced) for r in rows)
            est = self.clock.estimate(len(rows))
            if est is not None:
                k = min(k, max(1, int(self.budget_s / est)))
        k = max(1, k)
        idx = [r.session.row for r in rows]
        return {"state": self.pool.states[idx], "logits": self.pool.logits[idx],  # (B, S), (B, V)
                "uniforms": np.array([r.next_uniforms(k) for r in rows], np.float32),  # (B, K)
                "temperature": np.array([r.temperature for r in rows], np.float32),
                "top_k": np.array([r.top_k for r in rows], np.int64),
                "top_p": np.array([r.top_p for r in rows], np.float32)}

    def after_graph(self, rows: list[GenRow], start: np.ndarray, out: tuple, bad: np.ndarray,
                    replay: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                    fail: Callable[[GenRow], BaseException]) -> list[Session]:
        """Take one generation call's tokens, states and logits (rows flagged `bad` fail); returns the
        sessions that moved on. `replay(tokens (n,), state (S,))` recomputes a state that overshot a stop."""
        tokens, state_out, logits_out = out  # (B, K), (B, S), (B, V)
        moved: list[Session] = []
        for i, r in enumerate(rows):
            s = r.session
            if bad[i]:
                self.fail_row(r, fail(r))
                continue
            if r.final == "done":  # ended while in flight (closed, cut): its session is let go
                self.table.finish_op(s)
                continue
            keep, k = tokens.shape[1], tokens.shape[1]
            if r.stops:
                for j, t in enumerate(tokens[i].tolist()):
                    self._take(r, t)
                    if r.final:
                        keep = j + 1
                        break
            else:  # no stop strings: the whole chunk at once (K is never past max_tokens)
                r.buf.extend(tokens[i].tolist())
                r.produced += k
                if r.produced >= r.max_tokens:
                    r.final = "length"
            st, lg = state_out[i], logits_out[i]
            if keep < k:  # a stop inside the chunk: the state after the stop, not after the chunk
                st, lg = replay(tokens[i, :keep], start[i])
            self.pool.states[s.row], self.pool.logits[s.row] = st, lg
            s.steps += keep
            moved.append(s)
            if r.cancelled:  # the client left: the state is kept, nothing more is reported
                self.table.finish_op(s)
            elif r.final:
                self.finish(r, r.final)
            elif len(r.buf) >= (r.chunk_tokens if r.emitted else 1):
                self._emit(r, done=False)
        return moved

    def _take(self, r: GenRow, t: int) -> None:
        """Record one generated token; mark the row final at a stop string or its length."""
        r.produced += 1
        r.buf.append(t)
        if r.stops:
            r.tail = (r.tail + self.model.vocab[t])[-r.maxstop:]
            if any(r.tail.endswith(x) for x in r.stops):
                r.final = "stop"
        if not r.final and r.produced >= r.max_tokens:
            r.final = "length"

    # -- the step path ----------------------------------------------------------------------------------------
    def _sample(self, rows: list[GenRow], logits: np.ndarray) -> None:
        """Sample one token for each row (vectorized) to be stepped next."""
        temp = np.array([r.temperature for r in rows], np.float64)
        topk = np.array([r.top_k for r in rows], np.int64)
        topp = np.array([r.top_p for r in rows], np.float64)
        u = np.array([r.uniform() for r in rows])  # (R,) one per token
        for r, t in zip(rows, sample(logits, temp, topk, topp, u).tolist()):
            r.token = t
            self._take(r, t)

    def after_step(self, rows: list[GenRow], logits_rows: np.ndarray) -> None:
        """After a step: count it, finish completed rows, sample the next token of the others."""
        cont, cont_idx = [], []
        for i, r in enumerate(rows):
            r.session.steps += 1
            if r.cancelled or r.final == "done":  # left while its step was in flight
                self.table.finish_op(r.session)
            elif r.final:
                self.finish(r, r.final)
            else:
                cont.append(r)
                cont_idx.append(i)
                if len(r.buf) >= (r.chunk_tokens if r.emitted else 1):  # first token at once: low TTFT
                    self._emit(r, done=False)
        if cont:
            self._sample(cont, logits_rows[cont_idx])

    # -- both -------------------------------------------------------------------------------------------------
    def _emit(self, r: GenRow, done: bool, reason: str = "") -> None:
        vocab = self.model.vocab
        # on the step path a step still in flight is counted when it lands; the handler reads the count now
        steps = r.session.steps + (1 if r in self.inflight and not self.graph else 0)
        r.queue.put_nowait(Chunk(r.buf, "".join([vocab[t] for t in r.buf]), done, reason, steps))
        r.buf = []
        r.emitted = True

    def finish(self, r: GenRow, reason: str) -> None:
        """End a generation: release the session (now, or when its call lands) and send the last chunk."""
        self.rows.pop(r, None)
        if r in self.new:
            self.new.remove(r)
        if r.final == "done" or r.cancelled:
            return
        inflight = r in self.inflight
        if reason == "cancelled" and not inflight and r.buf and not self.graph:
            r.buf.pop()  # sampled but never stepped: not part of the state, so not reported
        r.final = "done"
        if not inflight:
            self.table.finish_op(r.session)
        self._emit(r, done=True, reason=reason)
        self.gauge(len(self))

    def fail_row(self, r: GenRow, error: BaseException) -> None:
        """A generation ends with an error: tokens already stepped go out first, then the error."""
        self.rows.pop(r, None)
        if r.final == "done" or r.cancelled:
            self.table.finish_op(r.session)
            return
        if not self.graph:
            r.buf.pop()  # its step failed: not part of the state
        if r.buf:
            self._emit(r, done=False)
        r.final = "done"
        self.table.finish_op(r.session)
        r.queue.put_nowait(error)
        self.gauge(len(self))

    def cancel(self, r: GenRow) -> None:
        """Remove a row at once (client gone); the session keeps the state reached so far."""
        if r.cancelled or r.final == "done":
            return
        r.cancelled = True
        if r in self.new:
            self.new.remove(r)
        self.rows.pop(r, None)
        if r not in self.inflight:
            r.final = "done"
            self.table.finish_op(r.session)
        self.gauge(len(self))

    def cut_all(self) -> None:
        """Shutdown: end every generation now with reason 'cancelled'."""
        for r in list(self.new) + list(self.rows):
            self.finish(r, "cancelled")
