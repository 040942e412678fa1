"""Continuous batching: the only code that runs onnxruntime on the serving path.

One Batcher per model version. Each iteration it takes the pending single steps of all sessions
and every generating row (at most one step per session), runs ONE model.onnx call in its own thread,
scatters states and logits back into the version's StatePool, samples the next token of all
generating rows at once, and wakes a handler only when a chunk is ready. Multi-token feeds run on
sequence.onnx in the same thread call, feeds of equal length stacked into one batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .repository import ModelVersion
from .sampling import sample
from .sampling import top_k as top_k_of
from .sessions import Session, SessionTable, StatePool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class FeedJob:
    """Tokens to push through one session; the future gets logits (n, V) or (1, V) or None."""

    session: Session
    tokens: np.ndarray  # (n,) int64
    want: str  # "none" | "last" | "all"
    future: asyncio.Future  # result: (logits or None, (top ids, top probs) or None)
    top_k: int = 0


@dataclass(frozen=True)
class Chunk:
    """A piece of generated output handed to the handler."""

    tokens: list[int]
    text: str
    done: bool = False
    reason: str = ""  # "length" | "stop" | "cancelled" when done
    steps: int = 0  # tokens the session will have consumed once this chunk's tokens are stepped


@dataclass(eq=False)
class GenRow:
    """A generating session: a row that stays in the batch every iteration until it finishes."""

    session: Session
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    rng: np.random.Generator
    stops: tuple[str, ...]
    chunk_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    token: int = -1  # sampled, to be stepped next
    produced: int = 0
    final: str = ""  # finish reason once the last token is sampled
    buf: list[int] = field(default_factory=list)
    tail: str = ""
    maxstop: int = 0  # longest stop string
    emitted: bool = False  # a chunk went out already
    cancelled: bool = False
    uniforms: list[float] = field(default_factory=list)  # drawn ahead from rng, next one last

    def uniform(self) -> float:
        """The next uniform of this row's stream: the same numbers as rng.random() one by one, drawn in
        blocks (one numpy call per 64 tokens instead of one per token)."""
        if not self.uniforms:
            self.uniforms = self.rng.random(min(64, max(1, self.max_tokens - self.produced))).tolist()[::-1]
        return self.uniforms.pop()


@dataclass(eq=False)
class Plan:
    """One iteration's work, as _schedule picked it: what _execute runs and _update writes back."""

    feeds1: list[FeedJob]  # single-token feeds, stepped with the generating rows
    rows: list[GenRow]  # generating rows, one token each
    seqs: list[FeedJob]  # multi-token feeds
    step_rows: np.ndarray  # (B,) pool rows of feeds1 then rows
    step_tok: np.ndarray  # (B,) int64
    step_state: np.ndarray | None  # (B, S)
    seq_in: list[tuple[list[FeedJob], np.ndarray, np.ndarray]]  # per feed length: jobs, (G, T), (G, S)


class Batcher:
    """Gathers the steps of all sessions of one model version into single onnxruntime calls."""

    def __init__(self, model: ModelVersion, pool: StatePool, table: SessionTable, max_batch: int,
                 max_wait_s: float, metrics=None, inline_rows: int = 0) -> None:
        self.model = model
        self.inline_rows = inline_rows  # step batches this small run on the loop thread (no thread hop)
        self.pool = pool
        self.table = table
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._feeds: list[FeedJob] = []
        self._new_rows: list[GenRow] = []
        self._rows: dict[GenRow, None] = {}  # insertion-ordered set of generating rows
        self._inflight: set[GenRow] = set()
        self._wake = asyncio.Event()
        self._exec = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{model.key}")
        self._task: asyncio.Task | None = None
        self.last_batch = 0
        self.batches = 0

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.key}")

    async def stop(self) -> None:
        """Stop the task and the onnxruntime thread; pending work is cancelled."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._feeds:
            if not job.future.done():
                job.future.cancel()
        self._exec.shutdown(wait=False)

    def stats(self) -> dict:
        """What the batcher is doing now: generating rows, queued feeds, size of the last batch."""
        return {"generating": len(self._rows) + len(self._new_rows), "queued_feeds": len(self._feeds),
                "last_batch": self.last_batch, "batches": self.batches}

    # -- submissions (event loop thread) -----------------------------------------------------------
    def feed(self, session: Session, tokens: np.ndarray, want: str, top_k: int = 0) -> asyncio.Future:
        """Queue a feed; the session must be marked busy by the caller; released here when done.

        The future gets (logits, top): logits per `want`, top = (ids, probs) (n, top_k) when top_k > 0."""
        fut = asyncio.get_running_loop().create_future()
        self._feeds.append(FeedJob(session, tokens, want, fut, top_k if want != "none" else 0))
        self._wake.set()
        return fut

    def generate(self, row: GenRow) -> None:
        """Add a generating row; its first token is sampled from the session's last logits."""
        self._new_rows.append(row)
        self._wake.set()

    def cancel(self, row: GenRow) -> None:
        """Remove a row at once (client gone); the session keeps the state reached so far."""
        if row.cancelled or row.final == "done":
            return
        row.cancelled = True
        if row in self._new_rows:
            self._new_rows.remove(row)
        self._rows.pop(row, None)
        if row not in self._inflight:
            self._release(row)
        self._gauge()

    def end(self, row: GenRow, reason: str) -> None:
        """End one generation now; its handler gets a last chunk with this reason."""
        self._finish(row, reason)

    def cut_all(self) -> None:
        """Shutdown: end every generation now with reason 'cancelled'."""
        for row in list(self._new_rows) + list(self._rows):
            self._finish(row, "cancelled")

    # -- the loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._feeds or self._rows or self._new_rows):
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait_s > 0 and not self._rows and len(self._feeds) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            if self._new_rows:
                self._admit()
            try:
                await self._iteration(loop)
            except asyncio.CancelledError:
                raise
            except Exception:  # a model failure must not kill the batcher: fail the jobs, keep serving
                log.exception("onnxruntime call failed for %s", self.model.key)

    def _admit(self) -> None:
        rows, self._new_rows = self._new_rows, []
        logits = self.pool.logits[[r.session.row for r in rows]]  # (R, V)
        self._sample(rows, logits)
        for r in rows:
            if not r.cancelled:
                self._rows[r] = None
        self._gauge()

    def _sample(self, rows: list[GenRow], logits: np.ndarray) -> None:
        """Sample one token for each row (vectorized), record it, mark rows whose generation is complete."""
        temp = np.array([r.temperature for r in rows], np.float64)
        topk = np.array([r.top_k for r in rows], np.int64)
        topp = np.array([r.top_p for r in rows], np.float64)
        u = np.array([r.uniform() for r in rows])  # (R,) one per token
        ids = sample(logits, temp, topk, topp, u)  # (R,)
        vocab = self.model.vocab
        for r, t in zip(rows, ids.tolist()):
            r.token = t
            r.produced += 1
            r.buf.append(t)
            if r.stops:
                r.tail = (r.tail + vocab[t])[-r.maxstop:]
                if any(r.tail.endswith(s) for s in r.stops):
                    r.final = "stop"
            if not r.final and r.produced >= r.max_tokens:
                r.final = "length"

    async def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        """One step of the engine core: schedule (pick work), execute (onnxruntime), update (write back)."""
        plan = self._schedule()
        if plan is None:
            return
        t0 = time.perf_counter()
        out_step, out_seq = await self._execute(plan, loop)
        self._update(plan, out_step, out_seq, time.perf_counter() - t0)

    def _schedule(self) -> Plan | None:
        """Pick this iteration's work: single steps and generating rows up to max_batch, and every
        multi-token feed (grouped by length); gather their states."""
        room = self.max_batch
        feeds1 = [j for j in self._feeds if len(j.tokens) == 1][:room]
        room -= len(feeds1)
        rows = list(self._rows)
        if len(rows) > room:  # more generating rows than fit: rotate for fairness
            for r in rows[:room]:
                self._rows.pop(r)
                self._rows[r] = None
            rows = rows[:room]
        taken1 = set(map(id, feeds1))
        seqs = [j for j in self._feeds if len(j.tokens) > 1]
        self._feeds = [j for j in self._feeds if id(j) not in taken1 and len(j.tokens) == 1]
        if not (feeds1 or rows or seqs):
            return None
        pool = self.pool
        step_rows = np.array([j.session.row for j in feeds1] + [r.session.row for r in rows], np.int64)
        step_tok = np.array([int(j.tokens[0]) for j in feeds1] + [r.token for r in rows], np.int64)  # (B,)
        step_state = pool.states[step_rows] if len(step_rows) else None  # (B, S)
        groups: dict[int, list[FeedJob]] = {}
        for j in seqs:
            groups.setdefault(len(j.tokens), []).append(j)
        seq_in = [(g, np.stack([j.tokens for j in g]), pool.states[[j.session.row for j in g]])
                  for g in groups.values()]  # (G, T), (G, S)
        return Plan(feeds1, rows, seqs, step_rows, step_tok, step_state, seq_in)

    async def _execute(self, plan: Plan, loop: asyncio.AbstractEventLoop) -> tuple:
        """Run the plan in onnxruntime (on the loop for small feed-only batches, else in the ort thread);
        on failure every job of the plan fails and its session is released."""
        rows = plan.rows
        self._inflight.update(rows)
        try:
            if not (plan.seq_in or rows) and len(plan.step_rows) <= self.inline_rows:  # feeds only: no thread hops
                out = self._compute(plan.step_tok, plan.step_state, plan.seq_in)
                await asyncio.sleep(0)  # let the loop run between steps, as the thread call would
                return out
            return await loop.run_in_executor(self._exec, self._compute, plan.step_tok, plan.step_state,
                                              plan.seq_in, bool(rows))
        except Exception as e:
            self._inflight.difference_update(rows)
            for j in plan.feeds1 + plan.seqs:
                self.table.finish_op(j.session)
                if not j.future.done():
                    j.future.set_exception(e)
            for r in rows:
                if r.cancelled:
                    self.table.finish_op(r.session)
                else:
                    self._finish(r, "cancelled")
            raise
        finally:
            self._inflight.difference_update(rows)

    def _update(self, plan: Plan, out_step, out_seq, dt: float) -> None:
        """Write states and logits back into the pool, answer the feeds, advance the generating rows."""
        feeds1, rows, seqs, step_rows = plan.feeds1, plan.rows, plan.seqs, plan.step_rows
        pool = self.pool
        self.last_batch = len(step_rows)
        self.batches += 1
        if self.metrics is not None:
            self.metrics.observe_batch(self.model.key, len(step_rows), dt,
                                       len(step_rows) + sum(len(j.tokens) for j in seqs), len(rows))
        if out_step is not None:
            logits, state = out_step  # (B, V), (B, S)
            pool.states[step_rows] = state
            pool.logits[step_rows] = logits
            pool.has_logits[step_rows] = True
            tops = [i for i, j in enumerate(feeds1) if j.top_k]
            if tops:  # top-k of every feed that asked, in one vectorized call
                ids, probs = top_k_of(logits[tops], np.array([feeds1[i].top_k for i in tops]))  # (m, K)
                tops = dict(zip(tops, zip(ids[:, None], probs[:, None])))
            for i, j in enumerate(feeds1):
                self._done_feed(j, logits[i:i + 1], tops.get(i) if tops else None)
        for (g, _, _), (logits, state) in zip(plan.seq_in, out_seq):  # (G, T, V), (G, S)
            gr = [j.session.row for j in g]
            pool.states[gr] = state
            pool.logits[gr] = logits[:, -1]
            pool.has_logits[gr] = True
            for i, j in enumerate(g):
                lg = logits[i] if j.want == "all" else logits[i, -1:]  # (n, V) or (1, V)
                self._done_feed(j, logits[i], top_k_of(lg, j.top_k) if j.top_k else None)
        if rows:
            self._advance(rows, logits_rows=out_step[0][len(feeds1):])

    def _compute(self, tok, state, seq_in, gen: bool = False):
        """Runs in the onnxruntime thread: one step call and one sequence call per feed length.

        gen: the batch has generating rows; it runs on the step session with generation's threading."""
        out_step = None
        if len(tok):
            step = self.model.step_gen if gen and self.model.step_gen is not None else self.model.step
            out_step = step.run(["logits", "state_out"], {"tokens": tok, "state": state})
        out_seq = [self.model.sequence.run(["logits", "state_out"], {"tokens": t, "state": s})
                   for _, t, s in seq_in]
        return out_step, out_seq

    def _done_feed(self, j: FeedJob, logits: np.ndarray, top) -> None:
        j.session.steps += len(j.tokens)
        self.table.finish_op(j.session)
        if j.future.done():
            return
        if j.want == "none":
            j.future.set_result((None, None))
        elif j.want == "last":
            j.future.set_result((logits[-1:].copy(), top))
        else:
            j.future.set_result((logits.copy(), top))

    def _advance(self, rows: list[GenRow], logits_rows: np.ndarray) -> None:
        """After a step: count it, finish completed rows, sample the next token of the others."""
        cont, cont_idx = [], []
        for i, r in enumerate(rows):
            r.session.steps += 1
            if r.cancelled or r.final == "done":  # left while its step was in flight
                self.table.finish_op(r.session)
            elif r.final:
                self._finish(r, r.final)
            else:
                cont.append(r)
                cont_idx.append(i)
                if len(r.buf) >= (r.chunk_tokens if r.emitted else 1):  # first token at once: low TTFT
                    self._emit(r, done=False)
        if cont:
            self._sample(cont, logits_rows[cont_idx])

    def _emit(self, r: GenRow, done: bool, reason: str = "") -> None:
        vocab = self.model.vocab
        # A step still in flight is counted when it lands; the handler reads the count now.
        steps = r.session.steps + (1 if r in self._inflight else 0)
        r.queue.put_nowait(Chunk(r.buf, "".join([vocab[t] for t in r.buf]), done, reason, steps))
        r.buf = []
        r.emitted = True

    def _finish(self, r: GenRow, reason: str) -> None:
        """End a generation: release the session (now, or after its in-flight step) and send the last chunk."""
        self._rows.pop(r, None)
        if r in self._new_rows:
            self._new_rows.remove(r)
        if r.final == "done" or r.cancelled:
            return
        inflight = r in self._inflight
        if reason == "cancelled" and not inflight and r.buf:
            r.buf.pop()  # sampled but never stepped: not part of the state, so not reported
        r.final = "done"
        if not inflight:
            self.table.finish_op(r.session)
        self._emit(r, done=True, reason=reason)
        self._gauge()

    def _release(self, r: GenRow) -> None:
        r.final = "done"
        self.table.finish_op(r.session)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.generating(self.model.key, len(self._rows) + len(self._new_rows))
