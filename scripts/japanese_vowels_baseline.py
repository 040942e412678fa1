"""Nearest-neighbour baselines for JapaneseVowels, in numpy: what the shipped LSTM is measured against.

    .venv/bin/python scripts/japanese_vowels_baseline.py      # reads data/japanese_vowels/{train,test}.csv

1-NN with three distances between a test utterance and every training one (270 x 370 pairs):
- euclidean: both series resampled to 29 frames (linear interpolation per coefficient), Euclidean distance;
- dtw: multivariate ("dependent") dynamic time warping, squared Euclidean cost per frame pair, no window;
- dtw-z: the same after z-normalising each coefficient with the training set's mean and std.
Prints the test accuracy of each as JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from rnnserve.trainer.series import SeriesSet, load_csv  # numpy only: no torch

ROOT = Path(__file__).resolve().parents[1]


def resample(x: np.ndarray, n: int) -> np.ndarray:
    """(T, F) -> (n, F) by linear interpolation over the normalised time axis."""
    src = np.linspace(0.0, 1.0, len(x))
    dst = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(dst, src, x[:, f]) for f in range(x.shape[1])], axis=1)


def dtw_to_all(q: np.ndarray, refs: np.ndarray, ref_len: np.ndarray) -> np.ndarray:
    """DTW distance from q (Tq, F) to each of refs (N, Tmax, F) whose true lengths are ref_len (N,)."""
    N, Tm, _ = refs.shape
    cost = ((q[:, None, None, :] - refs.transpose(1, 0, 2)[None]) ** 2).sum(-1)  # (Tq, Tm, N)
    D = np.full((len(q) + 1, Tm + 1, N), np.inf)
    D[0, 0] = 0.0
    for i in range(1, len(q) + 1):
        for j in range(1, Tm + 1):
            D[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(D[i - 1, j], D[i, j - 1]), D[i - 1, j - 1])
    return D[len(q), ref_len, np.arange(N)]


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean())


def main() -> int:
    """Run the three 1-NN baselines on the shipped split."""
    train = load_csv(ROOT / "data" / "japanese_vowels" / "train.csv")
    test = load_csv(ROOT / "data" / "japanese_vowels" / "test.csv", classes=train.classes)
    y_tr = np.array([int(lab[0]) for lab in train.labels])
    y_te = np.array([int(lab[0]) for lab in test.labels])
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    n = max(len(s) for s in train.seqs + test.seqs)
    a = np.stack([resample(s, n).ravel() for s in train.seqs])  # (N_tr, n F)
    b = np.stack([resample(s, n).ravel() for s in test.seqs])
    d = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None]
    out["euclidean_resampled"] = accuracy(y_tr[d.argmin(1)], y_te)
    frames = np.concatenate(train.seqs)
    mean, std = frames.mean(0), frames.std(0)
    for name, norm in (("dtw", lambda s: s), ("dtw_z", lambda s: (s - mean) / std)):
        tr = SeriesSet(train.path, tuple(norm(s) for s in train.seqs), train.features, train.ids)
        lens = np.array([len(s) for s in tr.seqs])
        refs = np.zeros((len(tr.seqs), lens.max(), frames.shape[1]))
        for i, s in enumerate(tr.seqs):
            refs[i, : len(s)] = s
        pred = [y_tr[dtw_to_all(norm(q).astype(np.float64), refs, lens).argmin()] for q in test.seqs]
        out[name] = accuracy(np.array(pred), y_te)
    out["test_sequences"] = len(test.seqs)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
