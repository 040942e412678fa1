"""The units of work the engine hands the batcher and the batcher hands back (feeds, generating rows,
generated chunks, one iteration's plan), and what the engine answers its callers with. Shared by
engine.py, batcher.py and the servicers, so none reaches into another.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from .repository import ModelVersion
from .sessions import Session


@dataclass(eq=False)
class FeedJob:
    """Tokens to push through one session; the future gets logits (n, V) or (1, V) or None.

    A feed of more than one token runs in slices (`pos` tokens done so far) between other sessions'
    steps; it is atomic all the same: on failure the session is put back as it was before the feed."""

    session: Session
    tokens: np.ndarray  # (n,) int64
    want: str  # "none" | "last" | "all"
    future: asyncio.Future  # result: (logits or None, (top ids, top probs) or None)
    top_k: int = 0
    pos: int = 0  # tokens already run
    parts: list[np.ndarray] = field(default_factory=list)  # logits of the slices run, as `want` needs them
    before: tuple[np.ndarray, np.ndarray, bool] | None = None  # (state, logits, has_logits) before the feed

    @property
    def left(self) -> int:
        """Tokens still to run."""
        return len(self.tokens) - self.pos


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

    def next_uniforms(self, k: int) -> list[float]:
        """The next k uniforms of the stream, in order (the same numbers as k calls of uniform())."""
        out: list[float] = []
        while len(out) < k:
            if not self.uniforms:
                self.uniforms = self.rng.random(min(64, max(k - len(out), self.max_tokens - self.produced))
                                                ).tolist()[::-1]
            take = min(k - len(out), len(self.uniforms))
            out.extend(self.uniforms[:-take - 1:-1])
            del self.uniforms[-take:]
        return out


@dataclass(eq=False)
class Plan:
    """One iteration's work, as the batcher's schedule phase picked it: what execute runs and update writes back."""

    feeds1: list[FeedJob]  # single-token feeds, stepped with the generating rows
    rows: list[GenRow]  # generating rows, one token each
    seqs: list[FeedJob]  # multi-token feeds with a slice in this iteration
    step_rows: np.ndarray  # (B,) pool rows of feeds1 then rows
    step_tok: np.ndarray  # (B,) int64
    step_state: np.ndarray | None  # (B, S)
    seq_in: list[tuple[list[FeedJob], np.ndarray, np.ndarray]]  # per slice length: jobs, (G, T), (G, S)
    gen_rows: list[GenRow] = field(default_factory=list)  # rows generating K tokens in generate.onnx
    gen_in: dict[str, np.ndarray] | None = None  # its inputs
    gen_first: tuple[list[GenRow], dict[str, np.ndarray]] | None = None  # new rows: their first token, K=1

    def split(self) -> list[Plan]:
        """The step part, the generation call and the slices as separate plans, run in that order (steps
        answered first: a ping-pong client then waits for one other call at most), or this plan alone."""
        none = np.zeros(0, np.int64)
        parts = []
        if len(self.step_rows):
            parts.append(Plan(self.feeds1, self.rows, [], self.step_rows, self.step_tok, self.step_state, []))
        if self.gen_first is not None:  # first tokens in a call of their own: K=1 does not hold the others back
            parts.append(Plan([], [], [], none, none, None, [], *self.gen_first))
        if self.gen_rows:
            parts.append(Plan([], [], [], none, none, None, [], self.gen_rows, self.gen_in))
        if self.seq_in:
            parts.append(Plan([], [], self.seqs, none, none, None, self.seq_in))
        return parts if len(parts) > 1 or self.gen_first is not None else [self]


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
    forecast: np.ndarray | None = None  # (H, O) a forecaster's rollout when feed asked a horizon
    model: ModelVersion | None = None  # the version that ran the feed


@dataclass(frozen=True)
class StateView:
    """A session's state vector (S,) float32 with its model, step count and last logits (V,) if any."""

    session_id: str
    model: ModelVersion
    state: np.ndarray
    steps: int
    logits: np.ndarray | None = None
