"""Vectorized sampling over a batch of rows: temperature, top-k, top-p, then inverse-CDF on one uniform each."""
from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
           uniforms: np.ndarray) -> np.ndarray:
    """logits (R, V), per-row temperature/top_k/top_p (R,), uniforms in [0, 1) (R,) -> token ids (R,).

    temperature 0 = argmax; top_k 0 = all; top_p 0 or >= 1 = no nucleus filter.
    """
    V = logits.shape[1]
    out = np.argmax(logits, axis=1)  # (R,) greedy for temperature 0
    hot = temperature > 0
    if not hot.any():
        return out
    rows = np.nonzero(hot)[0]
    lg = logits[rows].astype(np.float64) / temperature[rows, None]  # (r, V)
    order = np.argsort(-lg, axis=1)  # (r, V) most probable first
    srt = np.take_along_axis(lg, order, axis=1)  # (r, V)
    p = np.exp(srt - srt[:, :1])  # (r, V) unnormalised, max first
    k = top_k[rows]
    k = np.where((k <= 0) | (k > V), V, k)  # (r,)
    p[np.arange(V)[None, :] >= k[:, None]] = 0.0
    tp = top_p[rows]
    nucleus = (tp > 0) & (tp < 1)
    if nucleus.any():
        c = np.cumsum(p, axis=1)  # (r, V)
        c /= c[:, -1:]
        # keep a token if the mass before it is < top_p (the first token always stays)
        before = c - p / p.sum(axis=1, keepdims=True)
        drop = (before >= tp[:, None]) & nucleus[:, None]
        p[drop] = 0.0
    cdf = np.cumsum(p, axis=1)  # (r, V)
    target = uniforms[rows] * cdf[:, -1]  # (r,)
    idx = np.minimum((cdf <= target[:, None]).sum(axis=1), V - 1)  # (r,)
    # never land on a zeroed tail slot: clamp to the last kept position
    last_kept = (p > 0).sum(axis=1) - 1
    idx = np.minimum(idx, last_kept)
    out[rows] = order[np.arange(len(rows)), idx]
    return out
