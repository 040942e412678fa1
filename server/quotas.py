"""Per-principal quotas: live sessions, tokens per second (fed and generated), generations at once.

A limit of 0 is no limit. Tokens per second is a bucket that refills at the rate and holds one second's
worth: a request is admitted while the bucket is not in debt and takes its tokens (a long feed may
overdraw it; the next request then waits for the refill). A generation takes its max_tokens up front and
gives back what it did not generate. Every refusal is RESOURCE_EXHAUSTED naming the limit.
"""
from __future__ import annotations

import time
from collections import Counter

from .auth import Principal
from .errors import ResourceExhausted


class Quotas:
    """The running counts per principal name, checked against each principal's Limits."""

    def __init__(self) -> None:
        self.sessions: Counter[str] = Counter()  # live sessions per principal (kept by the session table)
        self.generations: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (balance, when)

    def _who(self, p: Principal) -> str:
        return f"principal {p.name!r}" if p.name else "the anonymous principal"

    def check_open(self, p: Principal) -> None:
        """Before a new session: refused past the principal's live-session quota."""
        limit = p.limits.sessions
        if limit and self.sessions[p.name] >= limit:
            raise ResourceExhausted(f"{self._who(p)} holds its quota of {limit} live sessions (the sessions "
                                    "limit of its token, or --quota-sessions): close some first")

    def spend(self, p: Principal, tokens: int) -> None:
        """Take tokens from the principal's per-second bucket, or refuse while it is in debt."""
        rate = p.limits.tokens_per_s
        if not rate:
            return
        now = time.monotonic()
        balance, when = self._buckets.get(p.name, (rate, now))
        balance = min(rate, balance + (now - when) * rate)
        if balance < 0:
            raise ResourceExhausted(f"{self._who(p)} is over its quota of {rate:g} tokens per second (the "
                                    f"tokens_per_s limit of its token, or --quota-tokens-per-s): retry in "
                                    f"{-balance / rate:.2f} s")
        self._buckets[p.name] = (balance - tokens, now)

    def refund(self, p: Principal, tokens: int) -> None:
        """Give back tokens taken but not used (a generation that stopped early)."""
        if p.limits.tokens_per_s and tokens > 0 and p.name in self._buckets:
            balance, when = self._buckets[p.name]
            self._buckets[p.name] = (balance + tokens, when)

    def start_generation(self, p: Principal) -> None:
        """Before a generation: refused past the principal's quota of generations at once."""
        limit = p.limits.generations
        if limit and self.generations[p.name] >= limit:
            raise ResourceExhausted(f"{self._who(p)} already runs its quota of {limit} generations at once (the "
                                    "generations limit of its token, or --quota-generations): wait for one to end")
        self.generations[p.name] += 1

    def end_generation(self, p: Principal) -> None:
        """A generation ended."""
        self.generations[p.name] -= 1
        if self.generations[p.name] <= 0:
            del self.generations[p.name]
