"""Vectorized sampling over a batch of rows: temperature, top-k, top-p, then inverse-CDF on one uniform each.

Defined for every temperature a client may send: at or below GREEDY_BELOW (0 included) a row is greedy
(argmax), and above it the logits are shifted by their maximum before the division, so a tiny
temperature cannot overflow into infinities or NaN.
"""
from __future__ import annotations

import numpy as np

GREEDY_BELOW = 1e-6  # temperatures at or below this sample greedily


def sample(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
           uniforms: np.ndarray) -> np.ndarray:
    """logits (R, V), per-row temperature/top_k/top_p (R,), uniforms in [0, 1) (R,) -> token ids (R,).

    temperature <= GREEDY_BELOW = argmax; top_k 0 = all; top_p 0 or >= 1 = no nucleus filter.
    """
    V = logits.shape[1]
    out = np.argmax(logits, axis=1)  # (R,) greedy for temperature 0
    hot = temperature > GREEDY_BELOW
    if not hot.any():
        return out
    k = np.where((top_k <= 0) | (top_k >= V), V, top_k)  # (R,) V = no top-k filter
    plain = hot & (k == V) & ((top_p <= 0) | (top_p >= 1))  # no filter: no sort needed
    if plain.any():
        rows = np.nonzero(plain)[0]
        out[rows] = _sample_plain(logits[rows], temperature[rows], uniforms[rows])
    rows = np.nonzero(hot & ~plain)[0]
    if len(rows):
        out[rows] = _sample_filtered(logits[rows], temperature[rows], k[rows], top_p[rows], uniforms[rows])
    return out


def _sample_plain(logits: np.ndarray, temperature: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse CDF in vocabulary order (no sort): each row's result depends on that row alone."""
    lg = logits - logits.max(axis=1, keepdims=True)  # (r, V) float32 (a quarter of the float64 time), <= 0
    lg /= temperature.astype(np.float32)[:, None]  # no overflow: at most 0, and -inf only underflows exp
    cdf = np.cumsum(np.exp(lg), axis=1)  # (r, V)
    target = (uniforms * cdf[:, -1]).astype(np.float32)  # (r,)
    idx = (cdf <= target[:, None]).sum(axis=1)  # (r,) first position whose cdf passes the target
    # u * total rounding up to total would run off the end (or onto an underflowed tail): take the last
    # token that has mass
    last = (cdf < cdf[:, -1:]).sum(axis=1)  # (r,) first index whose cdf reaches the total
    return np.minimum(idx, last)


def _take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[i, idx[i]] row by row, (n, m): np.take_along_axis(a, idx, axis=1) by plain indexing, the same numbers
    in a third of the time for the few rows of a step (it runs on every step and every sampled token)."""
    return a[np.arange(len(a))[:, None], idx]


def _sample_filtered(logits: np.ndarray, temperature: np.ndarray, k: np.ndarray, top_p: np.ndarray,
                     uniforms: np.ndarray) -> np.ndarray:
    """Top-k and/or top-p: sort each row, cut, inverse CDF over what is left (most probable first)."""
    V = logits.shape[1]
    lg = (logits.astype(np.float64) - logits.max(axis=1, keepdims=True)) / temperature[:, None]  # (r, V) <= 0
    order = np.argsort(-lg, axis=1)  # (r, V) most probable first
    srt = _take_rows(lg, order)  # (r, V)
    p = np.exp(srt - srt[:, :1])  # (r, V) unnormalised, max first
    p[np.arange(V)[None, :] >= k[:, None]] = 0.0
    nucleus = (top_p > 0) & (top_p < 1)
    if nucleus.any():
        c = np.cumsum(p, axis=1)  # (r, V)
        c /= c[:, -1:]
        # keep a token if the mass before it is < top_p (the first token always stays)
        before = c - p / p.sum(axis=1, keepdims=True)
        drop = (before >= top_p[:, None]) & nucleus[:, None]
        p[drop] = 0.0
    cdf = np.cumsum(p, axis=1)  # (r, V)
    target = uniforms * cdf[:, -1]  # (r,)
    idx = np.minimum((cdf <= target[:, None]).sum(axis=1), V - 1)  # (r,)
    # never land on a zeroed tail slot: clamp to the last kept position
    last_kept = (p > 0).sum(axis=1) - 1
    idx = np.minimum(idx, last_kept)
    return order[np.arange(len(idx)), idx]


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits (n, V), k -> ids (n, K) int64 most probable first, softmax probs (n, K), K = min(k, V).

    Rows asking different k take the largest and keep their own first k columns. Row by row independent of
    the batch (the same numbers whether a row is computed alone or with others)."""
    K = min(int(k), logits.shape[1])
    p = np.exp(logits - logits.max(axis=1, keepdims=True))  # (n, V)
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :K]  # (n, K)
    return ids, (p[:, ids[0]] if len(p) == 1 else _take_rows(p, ids))  # (n, K), (n, K)
