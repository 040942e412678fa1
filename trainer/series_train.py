"""rnn-train --series: sequence classification and next-frame forecasting on numeric frames.

Losses, in normalised units, summed over the steps they apply to (the optimiser step takes their mean):
- classify, `--labels sequence`: cross-entropy of the sequence's label at its last step;
- classify, `--labels step`: cross-entropy at every step;
- forecast, `--loss nll` (default): step t predicts frame t+1 as a diagonal Gaussian (mean, log-variance);
  the loss is its negative log-likelihood, 0.5 * sum_f (log_var + (x - mean)^2 / exp(log_var) + log 2 pi);
  `--loss mse`: the squared error of the mean alone, summed over features.
Truncated BPTT as for text: a batch of B sequences (shuffled per epoch, padded at the end) is read in chunks
of `--seq-len` steps, the state carried (detached) between chunks; each chunk with a target is one
optimiser step (Adam, warmup and cosine decay, clipping at `--clip`). A forecast of H steps ahead
(`rollout`) feeds each predicted mean back in as the next frame.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint
from .args import TrainArgs, TrainError
from .loop import STOP, check_finite, clip_gradients, lr_factor, pick_device, rng_state, set_rng_state
from .model import SeriesConfig, SeriesModel
from .report import append_row, load_history, plot_losses, progress
from .series import PAD_LABEL, SeriesBatches, SeriesSet, fit_normalization, load_series, pad, split_off

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
EVAL_BATCH = 64


def task_loss(config: SeriesConfig, scores: Tensor, x: Tensor, lengths: Tensor, y: Tensor | None,
              start: int) -> tuple[Tensor, int]:
    """Summed loss of a chunk and how many steps it covers: scores (B, t, O) are steps start..start+t-1
    of the padded raw frames x (B, T, F) with `lengths` (B,) and labels y (B,) or (B, T)."""
    B, t, O = scores.shape
    if config.task == "classify":
        if y.dim() == 1:  # one label per sequence, read at its last step
            last = lengths - 1
            rows = ((last >= start) & (last < start + t)).nonzero().squeeze(1)
            if len(rows) == 0:
                return scores.sum() * 0.0, 0
            logits = scores[rows, last[rows] - start]  # (b, C)
            return F.cross_entropy(logits, y[rows], reduction="sum"), len(rows)
        yy = y[:, start : start + t]
        n = int((yy != PAD_LABEL).sum())
        return F.cross_entropy(scores.reshape(-1, O), yy.reshape(-1), ignore_index=PAD_LABEL, reduction="sum"), n
    Fs = config.features
    steps = torch.arange(start, start + t, device=x.device)
    valid = (steps[None, :] + 1 < lengths[:, None]).to(scores.dtype)  # (B, t): frame t+1 exists
    target = x[:, start + 1 : start + 1 + t]
    if target.shape[1] < t:
        target = torch.cat([target, x.new_zeros(B, t - target.shape[1], Fs)], dim=1)
    return forecast_nll(scores, target, config.loss, valid), int(valid.sum())


def forecast_nll(scores: Tensor, target: Tensor, loss: str, valid: Tensor) -> Tensor:
    """Summed per-step loss of normalised targets (B, t, F) under scores (B, t, O) where valid (B, t) is 1."""
    Fs = target.shape[-1]
    err = target - scores[..., :Fs]
    if loss == "mse":
        per = (err * err).sum(-1)
    else:
        log_var = scores[..., Fs:]
        per = 0.5 * (log_var + err * err * torch.exp(-log_var) + LOG_2PI).sum(-1)  # (B, t)
    return (per * valid).sum()


@torch.no_grad()
def rollout(model: SeriesModel, context: Tensor, horizon: int, state: Tensor | None = None) -> Tensor:
    """Forecast `horizon` frames after raw frames context (B, T, F): (B, H, F) means in raw units, each fed back."""
    F_ = model.config.features
    out, state = model(context, state)  # (B, T, O)
    mean = out[:, -1, :F_]
    preds = [mean]
    for _ in range(horizon - 1):
        out, state = model.step(mean, state)
        mean = out[:, :F_]
        preds.append(mean)
    return torch.stack(preds, dim=1)


@torch.no_grad()
def evaluate(model: SeriesModel, data: SeriesSet, horizon: int = 0, device: str = "cpu") -> dict[str, float]:
    """Loss per target step (normalised units) and accuracy (classify) or one-step RMSE in raw units
    (forecast), from the initial state; with `horizon`, the H-step rollout RMSE and a last-value baseline's."""
    was = model.training
    model.eval()
    cfg = model.config
    total, count, correct, sq, frames = 0.0, 0, 0, 0.0, 0
    try:
        for s in range(0, len(data), EVAL_BATCH):
            x, lengths, y = (None if a is None else torch.from_numpy(a).to(device)
                             for a in pad(data, np.arange(s, min(s + EVAL_BATCH, len(data)))))
            scores, _ = model.scores(x)
            loss, n = task_loss(cfg, scores, model.normalize(x), lengths, y, 0)
            total, count = total + float(loss), count + n
            if cfg.task == "classify":
                pred = scores.argmax(-1)  # (B, T)
                if y.dim() == 1:
                    correct += int((pred[torch.arange(len(y)), lengths - 1] == y).sum())
                else:
                    correct += int(((pred == y) & (y != PAD_LABEL)).sum())
            else:
                mean = model.denormalize(scores)[:, :-1, : cfg.features]
                valid = (torch.arange(x.shape[1] - 1, device=x.device)[None] + 1 < lengths[:, None])
                sq += float((((mean - x[:, 1:]) ** 2).sum(-1) * valid).sum())
                frames += int(valid.sum()) * cfg.features
    finally:
        model.train(was)
    out = {"loss": total / max(count, 1), "targets": count}
    if cfg.task == "classify":
        out["accuracy"] = correct / max(count, 1)
    else:
        out["rmse"] = math.sqrt(sq / max(frames, 1))
        if horizon:
            out.update(rollout_errors(model, data, horizon, device))
    return out


def rollout_errors(model: SeriesModel, data: SeriesSet, horizon: int, device: str = "cpu") -> dict[str, float]:
    """RMSE (raw units) of an H-step rollout after all but the last H frames of each long-enough sequence,
    and of the last-value baseline (the last context frame repeated)."""
    was = model.training
    model.eval()
    sq = base = 0.0
    n = 0
    try:
        for seq in data.seqs:
            if len(seq) <= horizon:
                continue
            ctx = torch.from_numpy(seq[None, :-horizon]).to(device)
            truth = seq[-horizon:]
            pred = rollout(model, ctx, horizon)[0].cpu().numpy()
            sq += float(((pred - truth) ** 2).sum())
            base += float(((seq[-horizon - 1] - truth) ** 2).sum())
            n += truth.size
    finally:
        model.train(was)
    if not n:
        return {}
    return {f"rollout{horizon}_rmse": math.sqrt(sq / n), f"last_value{horizon}_rmse": math.sqrt(base / n),
            "rollout_sequences": n // (horizon * model.config.features)}


def eval_subset(data: SeriesSet | None, n: int) -> SeriesSet | None:
    """The fixed validation sample: `n` sequences spread evenly over `data` (a file sorted by class or speaker
    is still covered), the same ones every pass; all of them when n is 0 or at least their number."""
    if data is None or n <= 0 or n >= len(data):
        return data
    return data.subset(np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64)))


def _file_sha(path: str) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()


class SeriesRun:
    """One training run on numeric sequences; resumable from its checkpoint like the text runs."""

    def __init__(self, args: TrainArgs, resume: dict[str, Any] | None = None) -> None:
        self.args = a = args
        self.device = pick_device(a.device)
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        labels = a.labels if a.task == "classify" else None
        features = [f.strip() for f in a.features.split(",") if f.strip()] if a.features else None
        data = load_series(a.series, labels, features)
        self.data_sha = _file_sha(a.series)
        if resume is not None and resume["train"]["data_sha256"] != self.data_sha:
            raise TrainError(f"series {a.series} differs from the one the checkpoint was trained on")
        if a.val:
            self.train_set = data
            self.val_set = load_series(a.val, labels, list(data.features), data.classes or None)
        else:
            self.train_set, self.val_set = split_off(data, a.val_fraction, a.seed)
        self.test_set = load_series(a.test, labels, list(data.features), data.classes or None) if a.test else None
        self.val_sample = eval_subset(self.val_set, a.eval_sequences)
        if a.task == "classify" and len(data.classes) < 2:
            raise TrainError(f"{a.series}: {len(data.classes)} class(es) in the labels; classification needs 2 or more")
        torch.manual_seed(a.seed)
        np.random.seed(a.seed)
        self.config = SeriesConfig(features=len(data.features), task=a.task, classes=max(2, len(data.classes)),
                                   loss=a.loss, cell=a.cell, hidden_size=a.hidden, layers=a.layers,
                                   dropout=a.dropout, init_state=a.init_state, out_dropout=a.out_dropout,
                                   weight_drop=a.weight_drop)
        self.model = SeriesModel(self.config).to(self.device)
        mean, std = fit_normalization(self.train_set)  # the training split only
        self.model.set_normalization(torch.from_numpy(mean), torch.from_numpy(std))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=a.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.args))
        self.batches = SeriesBatches(len(self.train_set), a.batch, a.seed)
        self.step, self.wall, self.offset, self.metrics = 0, 0.0, 0, {}
        self.saved: int | None = None  # the step ckpt.pt holds, if this run wrote or resumed one
        self.carry: Tensor | None = None
        self.cur: tuple[Tensor, Tensor, Tensor | None] | None = None
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            tr = resume["train"]
            self.opt.load_state_dict(tr["optimizer"])
            self.sched.load_state_dict(tr["scheduler"])
            set_rng_state(tr["rng"])
            self.batches.position, self.offset = tr["position"], tr["offset"]
            self.step, self.wall, self.metrics = tr["step"], resume["metrics"]["wall_time_s"], dict(resume["metrics"])
            self.saved = self.step
            if self.offset:
                self.cur = self._batch(self.batches.indices(self.batches.position - 1))
                self.carry = tr["carry"].to(self.device)
        self.out = Path(a.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.history = load_history(self.out / "metrics.jsonl", self.step)
        except OSError as e:
            raise TrainError(f"--out {self.out}: cannot write the run folder there ({e.strerror or e})") from None

    def _batch(self, index: np.ndarray) -> tuple[Tensor, Tensor, Tensor | None]:
        x, lengths, y = pad(self.train_set, index)
        return (torch.from_numpy(x).to(self.device), torch.from_numpy(lengths).to(self.device),
                None if y is None else torch.from_numpy(y).to(self.device))

    def train_step(self) -> tuple[float, float]:
        """Chunks of the current batch until one has targets: forward from the carried state, backward,
        clip, Adam. Returns (loss per target step, gradient norm before clipping)."""
        a = self.args
        while True:
            if self.cur is None:
                self.cur, self.offset = self._batch(self.batches.next()), 0
            x, lengths, y = self.cur
            s, e = self.offset, min(self.offset + a.seq_len, x.shape[1])
            state = self.model.initial_state(x.shape[0]) if s == 0 else self.carry
            scores, state = self.model.scores(x[:, s:e], state)  # (B, t, O)
            xn = self.model.normalize(x) if self.config.task == "forecast" else x
            loss, n = task_loss(self.config, scores, xn, lengths, y, s)
            self.carry = state.detach()
            self.offset = e
            if e >= x.shape[1]:  # the batch is done: the next one starts from the initial state
                self.cur, self.offset = None, 0
            if n == 0:
                continue  # nothing to learn from in this chunk: only carry its state on
            self.opt.zero_grad(set_to_none=True)
            (loss / n).backward()
            norm = clip_gradients(self.params, a.clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            return float(loss.detach()) / n, norm

    def validate(self, whole: bool = False) -> dict[str, float]:
        """Validation metrics on the fixed --eval-sequences sample (recorded as val_*, comparable from pass to
        pass); with `whole`, also on every validation sequence (val_*_full), which the checkpoint then reports.
        Empty when nothing is held out."""
        if self.val_set is None:
            return {}
        horizon = self.args.horizon if self.config.task == "forecast" else 0
        m = evaluate(self.model, self.val_sample, horizon, self.device)
        named = {"val_loss": m["loss"], **{f"val_{k}": v for k, v in m.items() if k != "loss"},
                 "val_sequences": len(self.val_sample)}
        row = {"step": self.step, **named, "wall_time_s": round(self.wall, 3)}
        if whole and len(self.val_sample) < len(self.val_set):
            full = evaluate(self.model, self.val_set, horizon, self.device)
            named = {"val_loss": full["loss"], **{f"val_{k}": v for k, v in full.items() if k != "loss"},
                     "val_sequences": len(self.val_set)}
            row.update({f"{k}_full": v for k, v in named.items()})
        self.history.append(row)
        append_row(self.out / "metrics.jsonl", row)
        self.metrics.update(named)
        return m

    def test(self) -> dict[str, float]:
        """Held-out test metrics from --test, recorded as test_* in the checkpoint's metrics."""
        if self.test_set is None:
            return {}
        m = evaluate(self.model, self.test_set, self.args.horizon if self.config.task == "forecast" else 0,
                     self.device)
        self.metrics.update({"test_loss": m["loss"], **{f"test_{k}": v for k, v in m.items() if k != "loss"}})
        return m

    def info(self) -> dict[str, Any]:
        """What the export needs besides the weights: feature names, normalisation, classes, label mode."""
        t = self.train_set
        return {"features": list(t.features), "mean": [float(v) for v in self.model.in_mean.cpu()],
                "std": [float(v) for v in self.model.in_std.cpu()], "classes": list(t.classes),
                "labels": t.label_mode, "horizon": self.args.horizon or None}

    def save(self) -> Path:
        """Write ckpt.pt (a series checkpoint: trainer.checkpoint) and loss.png."""
        payload = {
            "kind": "series", "config": self.config.to_dict(), "series": self.info(), "vocab": [],
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "metrics": {**self.metrics, "val_loss": self.metrics.get("val_loss"), "steps": self.step,
                        "wall_time_s": round(self.wall, 3)},
            "train": {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(),
                      "position": self.batches.position, "offset": self.offset,
                      "carry": None if self.cur is None else self.carry.cpu(),
                      "step": self.step, "data_sha256": self.data_sha, "args": asdict(self.args)},
        }
        path = checkpoint.save(self.out / "ckpt.pt", payload)
        self.saved = self.step
        plot_losses(self.history, self.out / "loss.png")
        return path

    def run(self) -> dict[str, Any]:
        """Train to --steps (or --stop-at), validating and checkpointing every --eval-every steps.

        Raises KeyboardInterrupt (after saving) when stopped, RunError when the loss stops being finite.
        """
        a = self.args
        end = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
        self.model.train()
        with progress(self.step, end, a.progress) as bar:
            try:
                while self.step < end:
                    if STOP.is_set():
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    loss, norm = self.train_step()
                    self.wall += time.perf_counter() - t0
                    check_finite(loss, self.step, self.saved, self.out)
                    row = {"step": self.step, "loss": round(loss, 6), "grad_norm": round(norm, 6),
                           "lr": self.opt.param_groups[0]["lr"], "wall_time_s": round(self.wall, 3)}
                    self.history.append(row)
                    append_row(self.out / "metrics.jsonl", row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                    if a.log_every and self.step % a.log_every == 0:
                        log.info("step %d loss %.4f grad_norm %.3f lr %.2e", self.step, loss, norm,
                                 self.opt.param_groups[0]["lr"])
                    if self.step % a.eval_every == 0 or self.step == a.steps:
                        t0 = time.perf_counter()
                        m = self.validate(whole=self.step == a.steps)
                        if m:
                            full = {k[4:-5]: v for k, v in self.history[-1].items() if k.endswith("_full")}
                            log.info("step %d validation %s (%d sequences)%s (%.1f s)", self.step, json.dumps(m),
                                     len(self.val_sample), f", on all: {json.dumps(full)}" if full else "",
                                     time.perf_counter() - t0)
                        if self.step == a.steps:
                            self.test()
                        self.save()
            except KeyboardInterrupt:
                log.warning("interrupted at step %d: saving a resumable checkpoint", self.step)
                self.save()
                raise
        if self.step % a.eval_every and self.step != a.steps:
            self.save()
        return {k: v for k, v in self.metrics.items() if k.startswith(("val_", "test_"))}
