"""Who else is stepping on a batcher: whether a single-token feed has company to batch with, and how long a
lone queued step may wait for it.

A session stepping with no other one within ALONE_S takes the batcher's direct path (no queue, no wait).
When several do, a lone queued step waits some event-loop turns for the calls that have already arrived (gRPC
admits unary calls one per turn): TURNS_PER_SESSION per session seen stepping in the last ACTIVE_S, at most
--batch-turns. Two sessions wait a few turns; sixteen wait the full count, where it fills the batch.
"""
from __future__ import annotations

ALONE_S = 0.005  # no other session stepping within this long: the direct path
ACTIVE_S = 0.05  # sessions stepping are counted over windows this long
TURNS_PER_SESSION = 3  # loop turns a lone queued step waits per session stepping lately


class Company:
    """The recent single-token feeds of one batcher, by session (event loop thread only)."""

    def __init__(self) -> None:
        self.until = 0.0  # other sessions are stepping: batch until then (time.monotonic())
        self._last: object | None = None  # the session of the last single-token feed, and when
        self._last_at = 0.0
        self._window: set[object] = set()  # sessions that fed one token since _window_at
        self._window_at = 0.0
        self._before = 0  # how many did in the window before

    def saw(self, session: object, now: float) -> None:
        """A single-token feed of `session` arrived at `now` (time.monotonic())."""
        if now - self._window_at > ACTIVE_S:
            self._before, self._window, self._window_at = len(self._window), set(), now
        self._window.add(session)
        if self._last is not session and now - self._last_at < ALONE_S:
            self.until = now + ALONE_S
        self._last, self._last_at = session, now

    def turns(self, cap: int) -> int:
        """Loop turns a lone queued step may wait for others: per session stepping lately, at most `cap`."""
        return min(cap, TURNS_PER_SESSION * max(self._before, len(self._window)))
