"""Measuring and recording a training run: the loss, held-out evaluation, metrics.jsonl, loss.png, progress.

Split out of trainer/train.py so the training loop reads on its own; rnn-train and the bench use these.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import RNNModel


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-step cross-entropy summed over time and batch, in nats: (B, T, V), (B, T) -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


@torch.no_grad()
def stream_logits(model: RNNModel, ids: np.ndarray, streams: int = 1, chunk: int = 2048,
                  device: str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """(logits (S_b, t, V), targets (S_b, t)) chunk by chunk over ids, read in evaluation mode as `streams`
    contiguous streams from the initial state; chunks of `chunk` steps keep the activations small."""
    was_training = model.training
    model.eval()
    try:
        length = (len(ids) - 1) // streams
        data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        rows = torch.stack([data[b * length : b * length + length + 1] for b in range(streams)]).to(device)
        state = model.initial_state(streams).to(device)  # (S_b, S)
        for s in range(0, length, chunk):
            x = rows[:, s : min(s + chunk, length)]  # (S_b, t)
            logits, state = model(x, state)  # (S_b, t, V)
            yield logits, rows[:, s + 1 : min(s + chunk, length) + 1]
    finally:
        model.train(was_training)


def evaluate(model: RNNModel, ids: np.ndarray, streams: int = 1, chunk: int = 2048,
             device: str = "cpu") -> float:
    """Mean nats/char on ids, read as `streams` contiguous streams from the initial state."""
    total = sum(float(sequence_loss(logits, y)) for logits, y in stream_logits(model, ids, streams, chunk, device))
    return total / (((len(ids) - 1) // streams) * streams)


def eval_sample(ids: np.ndarray, chars: int) -> np.ndarray:
    """The fixed validation sample: the first `chars` scored characters of the held-out ids (chars + 1 ids, as
    each predicts the next), the same ones every pass so the losses compare; all of them for 0 or more."""
    return ids if chars <= 0 or chars + 1 >= len(ids) else ids[: chars + 1]


def fit_temperature(model: RNNModel, ids: np.ndarray, device: str = "cpu") -> float:
    """The softmax temperature T that minimises nats/char of logits / T on ids (one stream from the initial state).

    Fitted on held-out training text, it corrects a model that is overconfident on unseen text (the usual
    state after dropout training); folding 1/T into the head keeps the ONNX contract unchanged.
    """
    chunks = list(stream_logits(model, ids, device=device))
    logits = torch.cat([lg[0] for lg, _ in chunks]).float()  # (N, V)
    y = torch.cat([t[0] for _, t in chunks])  # (N,)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / np.exp(log_t), y))

    lo, hi = np.log(0.25), np.log(4.0)  # golden-section search on log T: the loss is unimodal in it
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2.0))


def load_history(path: Path, step: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows up to `step`, file rewritten to match (a resume drops later lines; step 0 empties it)."""
    if step == 0 or not path.is_file():
        path.write_text("")
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def progress_bar(start: int, end: int, enabled: bool):
    """A tqdm bar on stderr from step `start` to `end`; None when disabled or when stderr is not a terminal
    (a log file or a pipe would get every redraw of the bar)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=end, initial=start, file=sys.stderr, unit="step", mininterval=1.0, dynamic_ncols=True)


@contextmanager
def progress(start: int, end: int, enabled: bool) -> Iterator[Any]:
    """progress_bar for the duration of a block, with log records routed around it: while the bar is up, the
    root logger's console handlers print through tqdm.write, which clears the bar, prints the line and draws
    the bar again below it, so no log line lands on the bar's line. The bar is closed (its line ended) on exit."""
    bar = progress_bar(start, end, enabled)
    if bar is None:
        yield None
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.root.handlers)
    try:
        with logging_redirect_tqdm() if console else nullcontext():  # none: nothing prints onto the bar
            yield bar
    finally:
        bar.close()


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss (smoothed) and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    sample = [(r["step"], r["val_loss_sample"]) for r in history
              if "val_loss_sample" in r and r.get("val_loss") != r["val_loss_sample"]]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        w = max(1, len(losses) // 100)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, label=f"train (mean of {w})", lw=1)
    if sample:
        ax.plot(*zip(*sample), "o-", label="validation (first --eval-chars held-out chars)", lw=1.5)
    if val:
        ax.plot(*zip(*val), "s-" if not sample else "s", label="validation (whole held-out split)", ms=6)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / char")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
