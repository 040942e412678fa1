"""An exact prefix-state cache: for a recurrent model the state after a prompt is one fixed-size vector.

Many sessions begin with the same text (a system prompt, a template). The state (and last logits) a
session reached after its first feed is kept, keyed by model version, start state and the exact token
sequence; a new session whose first feed extends a cached sequence starts from that state and ingests
only the rest. Matches are at token granularity (any cached length, not blocks). Lookups use a rolling
hash per length and then compare the tokens themselves, so a hit is always exact. Bounded by a memory
budget with least-recently-used eviction; hits, misses, tokens saved and bytes are counted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_MOD = (1 << 61) - 1
_BASE = 1_000_003


@dataclass
class Entry:
    """A cached prefix: its tokens and the session's state and last logits after them."""

    tokens: np.ndarray  # (n,) int64
    state: np.ndarray  # (S,) float32
    logits: np.ndarray  # (V,) float32

    @property
    def nbytes(self) -> int:
        """What it holds in memory."""
        return self.tokens.nbytes + self.state.nbytes + self.logits.nbytes + 200


def _hashes(tokens: np.ndarray, lengths: list[int]) -> dict[int, int]:
    """The rolling hash of tokens[:n] for each n in lengths (one pass up to the longest)."""
    out, h, want = {}, 0, set(lengths)
    top = max(lengths, default=0)
    for i, t in enumerate(tokens[:top].tolist()):
        h = (h * _BASE + t + 1) % _MOD
        if i + 1 in want:
            out[i + 1] = h
    return out


class PrefixCache:
    """(model version, start, tokens) -> (state, logits), within `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()  # (model, start, n, hash) -> entry, LRU first
        self.lengths: dict[tuple, dict[int, int]] = {}  # (model, start) -> {length: entries of that length}
        self.nbytes = self.hits = self.misses = self.saved = 0

    def lookup(self, model: str, start: str, tokens: np.ndarray) -> tuple[int, Entry | None]:
        """The longest cached prefix of `tokens` (its length and entry), or (0, None)."""
        if not self.budget:
            return 0, None
        lengths = sorted((n for n in self.lengths.get((model, start), {}) if n <= len(tokens)), reverse=True)
        if lengths:
            hashes = _hashes(tokens, lengths)
            for n in lengths:
                key = (model, start, n, hashes[n])
                e = self.entries.get(key)
                if e is not None and np.array_equal(e.tokens, tokens[:n]):
                    self.entries.move_to_end(key)
                    self.hits += 1
                    self.saved += n
                    return n, e
        self.misses += 1
        return 0, None

    def put(self, model: str, start: str, tokens: np.ndarray, state: np.ndarray, logits: np.ndarray) -> None:
        """Remember the state after `tokens` from `start` (evicting the least recently used past the budget)."""
        n = len(tokens)
        if not self.budget or n == 0:
            return
        key = (model, start, n, _hashes(tokens, [n])[n])
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        e = Entry(np.array(tokens, np.int64), np.array(state, np.float32), np.array(logits, np.float32))
        if e.nbytes > self.budget:
            return
        self.entries[key] = e
        self.nbytes += e.nbytes
        by_len = self.lengths.setdefault((model, start), {})
        by_len[n] = by_len.get(n, 0) + 1
        while self.nbytes > self.budget:
            self._evict()

    def _evict(self) -> None:
        (model, start, n, _), e = self.entries.popitem(last=False)
        self.nbytes -= e.nbytes
        by_len = self.lengths[(model, start)]
        by_len[n] -= 1
        if not by_len[n]:
            del by_len[n]
            if not by_len:
                del self.lengths[(model, start)]

    def drop_model(self, model: str) -> None:
        """Forget a version's entries (it was unloaded)."""
        for key in [k for k in self.entries if k[0] == model]:
            self.entries.move_to_end(key, last=False)
            self._evict()
