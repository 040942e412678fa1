"""Continuous batching: the only code that runs onnxruntime on the serving path.

One Batcher per model version. Each iteration it takes the pending single steps of all sessions
and every generating row (at most one step per session), runs ONE model.onnx call in its own thread,
scatters states and logits back into the version's StatePool, samples the next token of all
generating rows at once, and wakes a handler only when a chunk is ready. Multi-token feeds run on
sequence.onnx in the same thread call, a slice of each per iteration (feeds.py), so a long feed delays
others by one slice at most. A row whose step yields NaN or infinity is not written back: its session
keeps its state and gets FAILED_PRECONDITION, the rest of the batch carries on (one log line per version).
Metrics are recorded once per iteration: batch size, call time, steps, and the queue time of the oldest
work the iteration starts (feeds keep their arrival times in a list beside the queue, not per step).
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from . import memory
from .company import Company
from .errors import NotFound, Unavailable
from .feeds import LongFeeds
from .finite import FiniteGuard, all_finite
from .generator import Generator
from .repository import ModelVersion
from .sampling import top_k as top_k_of
from .sessions import Session, SessionTable, StatePool
from .work import FeedJob, GenRow, Plan

log = logging.getLogger(__name__)
TRIM_AFTER_TOKENS = 50_000  # feed tokens after which an idle batcher returns freed heap to the system


class Batcher:
    """Gathers the steps of all sessions of one model version into single onnxruntime calls."""

    def __init__(self, model: ModelVersion, pool: StatePool, table: SessionTable, max_batch: int,
                 max_wait_s: float, metrics=None, inline_rows: int = 0, slice_s: float = 0.002,
                 on_stepped: Callable[[list[Session]], None] | None = None, gen_budget_s: float = 0.02,
                 batch_turns: int = 0) -> None:
        self.model = model
        self.inline_rows = inline_rows  # step batches this small run on the loop thread (no thread hop)
        self.pool = pool
        self.table = table
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_turns = batch_turns  # most loop turns a lone queued step waits (--batch-turns)
        self.metrics = metrics
        self._vector = model.kind == "vector"  # frames in, no generation
        self.on_stepped = on_stepped  # called with the sessions whose state moved on in an iteration
        self._feeds: list[FeedJob] = []  # single-token feeds, stepped with the generating rows
        self._feed_t: list[float] = []  # their arrival times (perf_counter), in the same order
        self._long_t: weakref.WeakKeyDictionary[FeedJob, float] = weakref.WeakKeyDictionary()  # long feeds' arrival
        self._oldest = 0.0  # arrival of the oldest work the iteration being scheduled starts (0: none)
        self.long = LongFeeds(pool, table, slice_s, self._settled)  # multi-token feeds, run in slices
        self.inflight_tokens = 0  # tokens of the feeds queued or running here (--max-inflight-tokens)
        self._run_options = ort.RunOptions()  # its terminate flag cuts a running call at shutdown
        self.finite = FiniteGuard(model, metrics)  # which rows of a step may be written back
        self._since_trim = 0  # feed tokens since memory was last handed back to the system
        self._running = False  # an iteration is under way (its awaits let other requests in)
        self.company = Company()  # who else is stepping: the direct path, and the turns a lone step waits
        self.gen = Generator(model, pool, table, gen_budget_s, self._gauge)
        self._queue_time = metrics.queue_of(model) if metrics is not None else None
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
        self.long.fail_all(Unavailable("the server stopped before this feed could finish; the session is as "
                                       "it was before it"))
        self._run_options.terminate = True  # a call still running in the thread ends now
        self._exec.shutdown(wait=False)

    def stats(self) -> dict:
        """What the batcher is doing now: generating rows, queued feeds, size of the last batch."""
        return {"generating": len(self.gen), "queued_feeds": len(self._feeds) + len(self.long),
                "last_batch": self.last_batch, "batches": self.batches}

    @property
    def pending(self) -> int:
        """Requests here not answered yet: single-token feeds waiting, long feeds queued or between slices,
        generations not yet admitted (rnnserve_pending_requests)."""
        return len(self._feeds) + len(self.long) + len(self.gen.new)

    # -- submissions (event loop thread) -----------------------------------------------------------
    def feed(self, session: Session, tokens: np.ndarray, want: str, top_k: int = 0) -> asyncio.Future:
        """Queue a feed; the session must be marked busy by the caller; released here when done.

        The future gets (logits, top): logits per `want`, top = (ids, probs) (n, top_k) when top_k > 0."""
        fut = asyncio.get_running_loop().create_future()
        job = FeedJob(session, tokens, want, fut, top_k if want != "none" else 0)
        if len(tokens) == 1 and self._idle(session):  # nothing else to batch with: step now, in the caller's turn
            self.inflight_tokens += 1
            self._step_now(job)
            return fut
        if len(tokens) == 1:
            self._feeds.append(job)
            self._feed_t.append(time.perf_counter())
        else:
            self.long.add(job)
            self._long_t[job] = time.perf_counter()
        self.inflight_tokens += len(tokens)
        self._since_trim += len(tokens)
        self._wake.set()
        return fut

    def _idle(self, session: Session) -> bool:
        """Nothing to batch with: no iteration running, nothing queued, and no other session stepping lately
        (when several do, their requests arrive together and one batched call serves them all)."""
        now = time.monotonic()
        self.company.saw(session, now)
        return not (self._running or self._feeds or self.long or len(self.gen)
                    or self.max_wait_s > 0 or self.inline_rows < 1 or now < self.company.until)

    def _step_now(self, job: FeedJob) -> None:
        """One single-token feed run at once on the event loop: no batcher wake-up, no thread hop, no batch
        bookkeeping (the ping-pong path when the batcher is idle). A NaN or infinity takes the batch update."""
        row, pool = job.session.row, self.pool
        tok = job.tokens[:1] if self._vector else np.array([int(job.tokens[0])], np.int64)  # (1,) or (1, F)
        state_in = pool.states[row:row + 1]  # (1, S) a view: onnxruntime has read it before the write below
        t0 = time.perf_counter()
        try:
            logits, state = self._compute(tok, state_in, [])[0]  # (1, V), (1, S)
        except Exception as e:  # as in an iteration: the job fails, the batcher keeps serving
            log.exception("onnxruntime call failed for %s", self.model.key)
            self._fail_feed(job, e)
            return
        dt = time.perf_counter() - t0
        if not all_finite(logits, state):
            plan = Plan([job], [], [], np.array([row], np.int64), tok, state_in.copy(), [])
            self._update(plan, (logits, state), [], dt)
            return
        self.last_batch = 1
        self.batches += 1
        if self.metrics is not None:
            self.metrics.observe_batch(self.model, 1, dt, 1, 0)
        pool.states[row], pool.logits[row], pool.has_logits[row] = state[0], logits[0], True
        self._done_feed(job, logits, top_k_of(logits, job.top_k) if job.top_k else None)
        if self.on_stepped is not None:
            self.on_stepped([job.session])

    def _settled(self, n: int) -> None:
        """A feed of n tokens is done with (answered, failed or cut)."""
        self.inflight_tokens -= n

    def generate(self, row: GenRow) -> None:
        """Add a generating row; its first token is sampled from the session's last logits."""
        self.gen.add(row)
        self._wake.set()

    def cancel(self, row: GenRow) -> None:
        """Remove a row at once (client gone); the session keeps the state reached so far."""
        self.gen.cancel(row)

    def end(self, row: GenRow, reason: str) -> None:
        """End one generation now; its handler gets a last chunk with this reason."""
        self.gen.finish(row, reason)

    def cut_all(self) -> None:
        """Shutdown: end every generation now with reason 'cancelled'; long feeds still queued fail."""
        self.gen.cut_all()
        self.long.fail_all(Unavailable("the server is shutting down: this feed was cut before its end and the "
                                       "session is as it was before it"))

    # -- the loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self._feeds or self.long or len(self.gen)):
                if self._since_trim > TRIM_AFTER_TOKENS:  # idle after a burst: give freed memory back
                    self._since_trim = 0
                    memory.trim()
                self._wake.clear()
                await self._wake.wait()
            if self.max_wait_s > 0 and not self.gen.rows and len(self._feeds) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            elif (len(self._feeds) == 1 and not (self.long or len(self.gen))
                  and time.monotonic() < self.company.until):  # others are stepping: theirs may join it
                turns = 0
                while turns < self.company.turns(self.batch_turns):  # re-read: arrivals raise the count
                    await asyncio.sleep(0)
                    turns += 1
            if self.gen.new:
                self.gen.admit()
            self._running = True
            try:
                await self._iteration(loop)
            except asyncio.CancelledError:
                raise
            except Exception:  # a model failure must not kill the batcher: fail the jobs, keep serving
                log.exception("onnxruntime call failed for %s", self.model.key)
            finally:
                self._running = False

    async def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        """One step of the engine core: schedule (pick work), execute (onnxruntime), update (write back)."""
        plan = self._schedule()
        if plan is None:
            return
        if self._oldest and self._queue_time is not None:
            self._queue_time.observe(time.perf_counter() - self._oldest)
        # steps first, answered before the long feeds' slices run: a ping-pong client waits for one slice
        for part in plan.split():
            t0 = time.perf_counter()
            out_step, out_seq, out_gen = await self._execute(part, loop)
            self._update(part, out_step, out_seq, time.perf_counter() - t0, out_gen)

    def _schedule(self) -> Plan | None:
        """Pick this iteration's work: single steps, then generating rows, then slices of long feeds, all
        within max_batch rows; gather their states."""
        room = self.max_batch
        oldest = self._feed_t[0] if self._feeds else 0.0
        feeds1, self._feeds = self._feeds[:room], self._feeds[room:]
        del self._feed_t[:len(feeds1)]
        room -= len(feeds1)
        rows = self.gen.pick(room)
        room -= len(rows)
        if self.gen.admitted_at and (not oldest or self.gen.admitted_at < oldest):
            oldest = self.gen.admitted_at
        self.gen.admitted_at = 0.0
        self.long.drop_closed(lambda j: NotFound(f"session {j.session.id} was closed during its feed"))
        seq_in = self.long.pick(room)
        if self._long_t:
            for g, _, _ in seq_in:
                for j in g:
                    t = self._long_t.pop(j, 0.0)
                    if t and (not oldest or t < oldest):
                        oldest = t
        self._oldest = oldest
        if not (feeds1 or rows or seq_in):
            return None
        gen_rows, gen_in, gen_first = [], None, None
        if self.gen.graph and rows:  # K tokens each in generate.onnx, not one in the step call
            first = [r for r in rows if not r.emitted]
            gen_rows = [r for r in rows if r.emitted]
            gen_first = (first, self.gen.graph_inputs(first)) if first else None
            gen_in = self.gen.graph_inputs(gen_rows) if gen_rows else None
            rows = []
        pool = self.pool
        step_rows = np.array([j.session.row for j in feeds1] + [r.session.row for r in rows], np.int64)
        if self._vector:  # frames (B, F); a vector model never generates
            step_tok = np.stack([j.tokens[0] for j in feeds1]) if feeds1 else np.empty((0, self.model.features),
                                                                                      np.float32)
        else:
            step_tok = np.array([int(j.tokens[0]) for j in feeds1] + [r.token for r in rows], np.int64)  # (B,)
        step_state = pool.states[step_rows] if len(step_rows) else None  # (B, S)
        return Plan(feeds1, rows, [j for g, _, _ in seq_in for j in g], step_rows, step_tok, step_state, seq_in,
                    gen_rows, gen_in, gen_first)

    async def _execute(self, plan: Plan, loop: asyncio.AbstractEventLoop) -> tuple:
        """Run the plan in onnxruntime (on the loop for small feed-only batches, else in the ort thread);
        on failure every job of the plan fails and its session is released (long feeds put back)."""
        rows = plan.rows + plan.gen_rows
        self.gen.inflight.update(rows)
        try:
            if not (plan.seq_in or rows) and len(plan.step_rows) <= self.inline_rows:  # feeds only: no thread hops
                out = self._compute(plan.step_tok, plan.step_state, plan.seq_in)
                await asyncio.sleep(0)  # let the loop run between steps, as the thread call would
                return out
            return await loop.run_in_executor(self._exec, self._compute, plan.step_tok, plan.step_state,
                                              plan.seq_in, bool(rows), plan.gen_in)
        except Exception as e:
            self.gen.inflight.difference_update(rows)
            for j in plan.feeds1:
                self._fail_feed(j, e)
            for j in plan.seqs:
                self.long.fail(j, e)
            for r in rows:
                if r.cancelled:
                    self.table.finish_op(r.session)
                else:
                    self.gen.finish(r, "cancelled")
            raise
        finally:
            self.gen.inflight.difference_update(rows)

    def _update(self, plan: Plan, out_step, out_seq, dt: float, out_gen=None) -> None:
        """Write finite states and logits back into the pool, answer the feeds, advance the generating rows."""
        feeds1, rows, step_rows, pool = plan.feeds1, plan.rows, plan.step_rows, self.pool
        moved: list[Session] = []  # sessions whose state moved on (whole feeds, generated tokens)
        if len(step_rows) or plan.gen_rows or not plan.seq_in:
            self.last_batch = len(step_rows) + len(plan.gen_rows)  # rows stepped (or generating) together
        self.batches += 1
        if self.metrics is not None:
            generated = len(rows) + (out_gen[0].size if out_gen is not None else 0)
            self.metrics.observe_batch(self.model, len(step_rows), dt,
                                       len(step_rows) + sum(t.size for _, t, _ in plan.seq_in) + generated - len(rows),
                                       generated)
        if out_step is not None:
            logits, state = out_step  # (B, V), (B, S)
            bad = self.finite.rows(logits, state)  # (B,)
            if bad.any():  # only the finite rows are written back (the rows below index the whole batch)
                ok, good_state, good_logits = step_rows[~bad], state[~bad], logits[~bad]
            else:
                ok, good_state, good_logits = step_rows, state, logits
            pool.states[ok], pool.logits[ok], pool.has_logits[ok] = good_state, good_logits, True
            tops = [i for i, j in enumerate(feeds1) if j.top_k and not bad[i]]
            if tops:  # top-k of every feed that asked, in one vectorized call
                ids, probs = top_k_of(logits[tops], max(feeds1[i].top_k for i in tops))  # (m, K)
                tops = dict(zip(tops, zip(ids[:, None], probs[:, None])))
            for i, j in enumerate(feeds1):
                if bad[i]:
                    self._fail_feed(j, self.finite.error(j.session))
                else:
                    self._done_feed(j, logits[i:i + 1], tops.get(i) if tops else None)
                    moved.append(j.session)
            if rows:
                n1 = len(feeds1)
                for i in np.nonzero(bad[n1:])[0]:
                    self.gen.fail_row(rows[i], self.finite.error(rows[i].session))
                good = [i for i in range(len(rows)) if not bad[n1 + i]]
                self.gen.after_step([rows[i] for i in good], logits[[n1 + i for i in good]])
                moved += [rows[i].session for i in good]
        if plan.gen_rows and out_gen is not None:
            tokens, state, logits = out_gen  # (B, K), (B, S), (B, V)
            self.gen.clock.timed(len(plan.gen_rows), tokens.shape[1], dt)
            moved += self.gen.after_graph(plan.gen_rows, plan.gen_in["state"], out_gen, self.finite.rows(logits, state),
                                          self._replay, lambda r: self.finite.error(r.session))
        for (g, tok, _), (logits, state, seconds) in zip(plan.seq_in, out_seq):  # (G, T, V), (G, S)
            self.long.clock.timed(len(g), tok.shape[1], seconds)
            bad = self.finite.rows(logits, state)
            for i in np.nonzero(bad)[0]:
                self.long.fail(g[i], self.finite.error(g[i].session))
            for j in self.long.apply(g, logits, state, bad):
                result = self.long.finish(j)
                moved.append(j.session)
                if not j.future.done():
                    j.future.set_result(result)
        if moved and self.on_stepped is not None:
            self.on_stepped(moved)

    def _compute(self, tok, state, seq_in, gen: bool = False, gen_in: dict | None = None):
        """Runs in the onnxruntime thread: one step call, one sequence call per slice length (each timed) and
        one generation call; any may be empty.

        gen: the batch has generating rows; the step and generation calls use generation's threading."""
        out_step, out_gen, ro = None, None, self._run_options
        i, o = self.model.io_names  # tokens/logits, or inputs/outputs for a vector model
        if len(tok):
            step = self.model.step_gen if gen and self.model.step_gen is not None else self.model.step
            out_step = step.run([o, "state_out"], {i: tok, "state": state}, ro)
        out_seq = []
        for _, t, s in seq_in:
            t0 = time.perf_counter()
            logits, st = self.model.sequence.run([o, "state_out"], {i: t, "state": s}, ro)
            out_seq.append((logits, st, time.perf_counter() - t0))
        if gen_in is not None:
            out_gen = self.model.generate.run(["tokens", "state_out", "logits_out"], gen_in, ro)
        return out_step, out_seq, out_gen

    def _replay(self, tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The state (S,) and logits (V,) after `tokens` (n,) from `state`: a generation cut at a stop."""
        logits, st = self.model.sequence.run(["logits", "state_out"], {"tokens": tokens[None], "state": state[None]})
        return st[0], logits[0, -1]

    def _done_feed(self, j: FeedJob, logits: np.ndarray, top) -> None:
        """A single-token feed is answered."""
        j.session.steps += 1
        self.table.finish_op(j.session)
        self._settled(1)
        if not j.future.done():
            j.future.set_result((None, None) if j.want == "none" else (logits.copy(), top))

    def _fail_feed(self, j: FeedJob, error: BaseException) -> None:
        """A single-token feed fails; its session was not written, so it is as before."""
        self.table.finish_op(j.session)
        self._settled(1)
        if not j.future.done():
            j.future.set_exception(error)

    def _gauge(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.generating(self.model, n)
