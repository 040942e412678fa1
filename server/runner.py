"""The work on a session once it is found: feeds (through the prefix cache), stateless inference,
generations; the checks that refuse a feed before it runs. The engine finds and claims the session."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

from . import auth, inputs
from .batcher import Batcher
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .models import Models
from .prefixes import PrefixCache
from .quotas import Quotas
from .repository import ModelVersion
from .sampling import top_k as top_k_of
from .sessions import Session, SessionTable
from .settings import Settings
from .work import Chunk, FeedResult, GenRow


class Generation:
    """A running generation: iterate it for Chunks; cancel() (also on client disconnect) stops it at once.

    Its time to first token and time per output token are observed here, once each, as chunks reach the
    handler (not per token)."""

    def __init__(self, runner: Runner, batcher: Batcher, row: GenRow, principal: auth.Principal) -> None:
        self._runner = runner
        self._batcher = batcher
        self.row = row
        self.principal = principal
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()
        self.started = time.perf_counter()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        metrics = self._runner.metrics
        timed = metrics.generation_of(self.row.session.model) if metrics is not None else None
        first_at, first_n, n = 0.0, 0, 0
        try:
            while True:
                chunk = await self.row.queue.get()
                if isinstance(chunk, BaseException):  # the batcher ended it with an error (a non-finite step)
                    raise chunk
                if timed is not None:
                    n += len(chunk.tokens)
                    if not first_at and n:
                        first_at, first_n = time.perf_counter(), n
                        timed[0].observe(first_at - self.started)
                    if chunk.done and n > first_n:
                        timed[1].observe((time.perf_counter() - first_at) / (n - first_n))
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
            self._runner.quotas.end_generation(self.principal)
            self._runner.quotas.refund(self.principal, self.row.max_tokens - self.row.produced)
        self._runner.generations.discard(self)


class Runner:
    """Feeds, inference and generations on sessions the engine has claimed."""

    def __init__(self, settings: Settings, models: Models, table: SessionTable, quotas: Quotas,
                 stepped: Callable[[list[Session]], None], metrics=None) -> None:
        self.settings = settings
        self.models = models
        self.table = table
        self.quotas = quotas
        self.stepped = stepped
        self.metrics = metrics
        self.prefixes = PrefixCache(int(settings.prefix_cache_mb * (1 << 20)))
        self.generations: set[Generation] = set()

    @property
    def batchers(self) -> dict[ModelVersion, Batcher]:
        return self.models.batchers

    async def feed(self, s: Session, tokens: Sequence[int] | np.ndarray | str,
                   output: str = "last", top_k: int = 0, logits: bool = True, horizon: int = 0) -> FeedResult:
        """Push text, token ids or frames through a session (1 step: a batched step; more: sequence.onnx in
        slices), then, for a forecaster asked a horizon, roll out that many steps after it (FeedResult.forecast).

        top_k > 0 also returns the top-k ids and probabilities of each returned step (FeedResult.top),
        computed once for the whole batch. `logits`: whether the caller will send full logits back (with
        top_k, only to size the answer: a feed whose answer could not be sent is refused before it runs)."""
        mv = s.model
        top_k = max(0, int(top_k))
        self.check_feed(mv, len(tokens), output, top_k, logits)
        if horizon:
            self.check_horizon(mv, horizon)  # before the feed moves anything
        ids = inputs.check_input(mv, tokens)  # (n,) ids, or (n, F) frames for a vector model
        self.quotas.spend(auth.current.get(), len(ids))
        fresh = s.steps == 0 and s.origin is not None and output != "all" and mv.kind == "tokens"  # prefix cache
        if fresh:
            n, hit = self.prefixes.lookup(mv.key, s.origin, ids)
            self._count_prefix(hit is not None)
            if hit is not None:  # start from the cached state: only the rest is fed
                s.set_state(hit.state)
                s.set_logits(hit.logits)
                s.steps = n
                if n == len(ids):
                    self.stepped([s])
                    out = None if output == "none" else hit.logits[None].copy()  # (1, V)
                    return FeedResult(n, out, s.steps, top_k_of(out, top_k) if out is not None and top_k else None,
                                      model=mv)
            rest = ids[n:]
        s.busy = True
        # no shield: a cancelled caller cancels only this future; the batcher still runs the feed to its end
        # and releases the session (FeedJob bookkeeping does not depend on the future)
        logits_out, top = await self.batchers[mv].feed(s, rest if fresh else ids, output, top_k)
        if fresh and not s.closed and s.has_logits:
            self.prefixes.put(mv.key, s.origin, ids, s.state, s.logits)
        forecast = await self.forecast(s, horizon) if horizon else None  # never with the prefix cache (tokens)
        return FeedResult(len(ids), logits_out, s.steps, top, forecast, mv)

    def _count_prefix(self, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.prefix_cache(hit, self.prefixes.nbytes, self.prefixes.saved)

    def check_feed(self, mv: ModelVersion, n: int, output: str = "all", top_k: int = 0, logits: bool = True) -> None:
        """Refuse, before any work, a feed that is empty, too long, too big to answer, or over the budget of
        tokens in flight (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the limit)."""
        if n == 0:
            raise InvalidArgument("feed has no frames: send at least one" if mv.kind == "vector"
                                  else "feed has no tokens: send text or token ids")
        if top_k and mv.meta.task == "forecast":
            raise InvalidArgument(f"top_k is for token and class distributions; {mv.key} forecasts values")
        inputs.check_feed_size(n, self.settings.max_feed_tokens)
        steps_back = {"none": 0, "last": 1, "all": n}[output]
        inputs.check_answer_size(inputs.answer_bytes(steps_back, mv.output_size, logits or not top_k, top_k),
                                 self.settings.max_send_bytes, f"the answer to this feed of {n} tokens")
        running, limit = sum(b.inflight_tokens for b in self.batchers.values()), self.settings.max_inflight_tokens
        if running + n > limit:
            raise ResourceExhausted(f"the server is already running {running} feed tokens; {n} more would pass "
                                    f"its limit of {limit} (--max-inflight-tokens): retry shortly")

    def check_horizon(self, mv: ModelVersion, horizon: int) -> None:
        """A forecast horizon this model and --max-feed-tokens allow (INVALID_ARGUMENT otherwise)."""
        inputs.check_horizon(mv, horizon, self.settings.max_feed_tokens)

    async def infer(self, mv: ModelVersion, tokens: Sequence[int] | np.ndarray,
                    state: Sequence[float] | np.ndarray | None = None,
                    horizon: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Stateless: from the model's initial state (or `state`), logits (n, V), the final state (S,) and a
        forecaster's rollout (H, O) after them (None when horizon is 0)."""
        ids = inputs.check_input(mv, tokens)
        self.check_feed(mv, len(ids))
        if horizon:
            self.check_horizon(mv, horizon)
        self.quotas.spend(auth.current.get(), len(ids))
        s = self.table.create(mv, inputs.start_state(mv, "model" if state is None else "given", state), count=False)
        try:  # an ephemeral session: not counted against --max-sessions, never listed or stored
            s.busy = True
            logits, _ = await self.batchers[mv].feed(s, ids, "all")
            return logits, s.state, (await self.forecast(s, horizon) if horizon else None)
        finally:
            self.table.discard(s)

    async def forecast(self, s: Session, horizon: int) -> np.ndarray:
        """A forecaster's next `horizon` steps (H, O) from the session's last outputs: each predicted mean is
        fed back as the next frame, from a copy of the state, so the session itself stays where it is (the
        rollout is a guess, not an observation). Each step is a batched step call of an ephemeral session."""
        mv = s.model
        inputs.check_horizon(mv, horizon, self.settings.max_feed_tokens)
        if not s.has_logits:
            raise FailedPrecondition(f"session {s.id} has no forecast to roll out yet: feed at least one frame "
                                     "first (in the same request, or before it)")
        self.check_feed(mv, horizon, "all")
        self.quotas.spend(auth.current.get(), horizon)
        F, out = mv.features, np.empty((horizon, mv.output_size), np.float32)  # (H, O)
        last = s.logits  # (O,): outputs[:F] is the predicted next frame, in raw units
        e = self.table.create(mv, s.state, count=False)
        try:  # an ephemeral session, as infer's
            for h in range(horizon):
                e.busy = True
                (step,), _ = await self.batchers[mv].feed(e, last[None, :F].copy(), "last")  # (1, O)
                out[h] = last = step
        finally:
            self.table.discard(e)
        return out

    def generate(self, s: Session, max_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                 chunk_tokens: int = 0) -> Generation:
        """Start sampling in the batcher; iterate the result for chunks."""
        inputs.check_generable(s.model)
        if not s.has_logits:
            raise FailedPrecondition(f"session {s.id} has no distribution to sample from yet: "
                                     "feed at least one token first")
        row = GenRow(session=s, max_tokens=max_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), rng=np.random.default_rng(seed), stops=tuple(stop),
                     chunk_tokens=chunk_tokens or self.settings.chunk_tokens,
                     maxstop=max((len(x) for x in stop), default=0))
        who = auth.current.get()
        self.quotas.spend(who, max_tokens)  # what it does not generate is given back at its end
        self.quotas.start_generation(who)
        s.busy = True
        b = self.batchers[s.model]
        gen = Generation(self, b, row, who)
        self.generations.add(gen)
        b.generate(row)
        return gen
