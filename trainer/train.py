"""rnn-train: char-level language-model training with truncated BPTT, checkpoints and exact resume.

Loss: the per-step cross-entropy summed over time (`sequence_loss`); the step optimises the same
objective scaled to the mean per character, so `--clip` thresholds mean what they do for nn.RNN users.
Validation runs ONE stream from the model's initial state (the measurement the export reports from
onnxruntime) over a fixed sample of the held-out last 10%: its first `--eval-chars` characters, the same
every pass (val_loss_sample); the pass at `--steps` also scores all of it (val_loss, the export's measure).
`--val-streams N` trades the single stream for speed. Exit status: args.EXIT_STATUS.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import checkpoint
from .args import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, TrainArgs, TrainError, parse_args
from .data import CorpusError, StreamBatches, Vocab, load_text, split
from .loop import (
    STOP,
    RunError,
    check_finite,
    clip_gradients,
    lr_factor,
    pick_device,
    rng_state,
    set_rng_state,
)
from .model import ModelConfig, RNNModel
from .report import (
    append_row,
    eval_sample,
    evaluate,
    fit_temperature,
    load_history,
    plot_losses,
    progress,
    sequence_loss,
)
from .series import SeriesError

log = logging.getLogger(__name__)

_STOP = STOP  # set by SIGTERM/SIGINT; the loop stops between steps, so state stays whole
_rng_state, _set_rng_state, _pick_device = rng_state, set_rng_state, pick_device
__all__ = ["Run", "TrainArgs", "clip_gradients", "evaluate", "lr_factor", "main", "sequence_loss"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Run:
    """One training run: model, optimiser, data and bookkeeping; resumable from its checkpoint."""

    def __init__(self, args: TrainArgs, resume: dict[str, Any] | None = None) -> None:
        self.args = args
        self.device = _pick_device(args.device)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        text = load_text(args.data)
        self.data_sha = _sha256(text)
        if resume is not None:
            if resume["train"]["data_sha256"] != self.data_sha:
                raise TrainError(f"corpus {args.data} differs from the one the checkpoint was trained on")
            self.vocab = Vocab(tuple(resume["vocab"]))
        else:
            self.vocab = Vocab.from_text(text)
        ids = self.vocab.encode(text)
        self.train_ids, self.val_ids = split(ids)
        # --calibrate: the head of the corpus is held out for the temperature. Not the tail: that text runs on
        # into the validation split (the same play, its names), and withholding it costs far more there.
        held = round(len(self.train_ids) * args.calibrate)
        if args.calibrate and held < 2:
            raise TrainError(f"--calibrate {args.calibrate} holds out {held} chars: too few to fit a temperature")
        self.calib_ids = self.train_ids[:held] if held else None
        self.train_ids = self.train_ids[held:]
        if args.val_streams < 1 or (len(self.val_ids) - 1) // args.val_streams < 1:
            raise TrainError(f"--val-streams {args.val_streams} does not fit {len(self.val_ids)} validation chars")
        if (len(eval_sample(self.val_ids, args.eval_chars)) - 1) // args.val_streams < 1:
            raise TrainError(f"--eval-chars {args.eval_chars} is fewer than --val-streams {args.val_streams}")
        self.batches = StreamBatches(self.train_ids, args.batch, args.seq_len,
                                     shift_seed=args.seed if args.shift_epochs else None)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.config = ModelConfig(vocab_size=len(self.vocab), cell=args.cell, hidden_size=args.hidden,
                                  layers=args.layers, embed_size=args.embed, dropout=args.dropout,
                                  init_state=args.init_state, out_dropout=args.out_dropout,
                                  weight_drop=args.weight_drop)
        self.model = RNNModel(self.config).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=args.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.args))
        self.step, self.wall, self.val_loss, self.temperature = 0, 0.0, None, None
        self.val_loss_sample: float | None = None  # the latest pass on the --eval-chars sample
        self.val_sample_chars: int | None = None  # characters that sample holds
        self.saved: int | None = None  # the step ckpt.pt holds, if this run wrote or resumed one
        self.carry: Tensor | None = None  # (B, S) detached state carried into the next chunk
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            tr = resume["train"]
            self.opt.load_state_dict(tr["optimizer"])
            self.sched.load_state_dict(tr["scheduler"])
            _set_rng_state(tr["rng"])
            self.batches.position = tr["position"]
            self.step, self.wall = tr["step"], resume["metrics"]["wall_time_s"]
            self.val_loss = resume["metrics"]["val_loss"]
            self.val_loss_sample = resume["metrics"].get("val_loss_sample", self.val_loss)
            self.val_sample_chars = resume["metrics"].get("val_sample_chars")
            self.saved = self.step
            self.temperature = resume["metrics"].get("temperature")
            self.carry = None if tr["carry"] is None else tr["carry"].to(self.device)
        self.out = Path(args.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.history = load_history(self.out / "metrics.jsonl", self.step)
        except OSError as e:
            raise TrainError(f"--out {self.out}: cannot write the run folder there ({e.strerror or e})") from None

    @property
    def tokens(self) -> int:
        """Training tokens consumed so far."""
        return self.step * self.args.batch * self.args.seq_len

    def _record(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        append_row(self.out / "metrics.jsonl", row)

    def train_step(self) -> tuple[float, float]:
        """One TBPTT chunk: forward from the carried state, backward, clip, Adam. Returns (nats/char, norm)."""
        x, y, epoch_start = self.batches.next()
        x, y = x.to(self.device), y.to(self.device)  # (B, T)
        state = self.model.initial_state(x.shape[0]) if epoch_start or self.carry is None else self.carry
        logits, state = self.model(x, state)  # (B, T, V), (B, S)
        self.carry = state.detach()
        loss = sequence_loss(logits, y)  # summed over time and batch
        self.opt.zero_grad(set_to_none=True)
        (loss / y.numel()).backward()  # gradient of the mean per char
        norm = clip_gradients(self.params, self.args.clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return float(loss.detach()) / y.numel(), norm

    def _scored(self, ids: np.ndarray) -> int:
        return ((len(ids) - 1) // self.args.val_streams) * self.args.val_streams

    def validate(self, whole: bool = False) -> float:
        """Held-out loss on the fixed --eval-chars sample (val_loss_sample: the same chars every pass, so the
        passes compare); val_loss is the whole held-out split's (the export's measure), scored when the sample
        is all of it or when `whole` (the pass at --steps), else None: a sample's number, lower or higher than
        the split's, never stands in for it in a checkpoint. Recorded in metrics.jsonl; returns the sample's."""
        sample = eval_sample(self.val_ids, self.args.eval_chars)
        self.val_loss_sample = evaluate(self.model, sample, self.args.val_streams, device=self.device)
        self.val_sample_chars = self._scored(sample)
        self.val_loss = None
        if len(sample) == len(self.val_ids):
            self.val_loss = self.val_loss_sample
        elif whole:
            self.val_loss = evaluate(self.model, self.val_ids, self.args.val_streams, device=self.device)
        self._record({"step": self.step, "val_loss_sample": self.val_loss_sample,
                      "val_sample_chars": self.val_sample_chars,
                      **({} if self.val_loss is None else {"val_loss": self.val_loss}), "tokens": self.tokens,
                      "wall_time_s": round(self.wall, 3)})
        return self.val_loss_sample

    def calibrate(self) -> float:
        """Fit the softmax temperature on the held-out head of the training split; fold 1/T into the head."""
        t = fit_temperature(self.model, self.calib_ids, self.device)
        with torch.no_grad():
            self.model.head.weight.div_(t)
            self.model.head.bias.div_(t)
        self.temperature = t
        self._record({"step": self.step, "temperature": t})
        log.info("step %d temperature %.4f (fitted on %d held-out training chars)", self.step, t,
                 len(self.calib_ids))
        return t

    def save(self) -> Path:
        """Write ckpt.pt and loss.png beside metrics.jsonl."""
        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        payload = {
            "config": self.config.to_dict(),
            "vocab": list(self.vocab.chars),
            "model": model,
            "metrics": {"val_loss": self.val_loss, "val_loss_sample": self.val_loss_sample,
                        "val_sample_chars": self.val_sample_chars, "steps": self.step, "tokens": self.tokens,
                        "wall_time_s": round(self.wall, 3),
                        **({"temperature": self.temperature} if self.temperature is not None else {})},
            "train": {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": _rng_state(),
                "position": self.batches.position,
                "carry": None if self.carry is None else self.carry.cpu(),
                "step": self.step,
                "data_sha256": self.data_sha,
                "args": asdict(self.args),
            },
        }
        path = checkpoint.save(self.out / "ckpt.pt", payload)
        self.saved = self.step
        plot_losses(self.history, self.out / "loss.png")
        return path

    def run(self) -> float | None:
        """Train to --steps (or --stop-at), validating and checkpointing every --eval-every steps.

        The tokens/s of the log and the bar count training time only: validation and checkpoints are left out.
        Raises KeyboardInterrupt (after saving) when stopped, RunError when the loss stops being finite.
        """
        a = self.args
        end = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
        t_last, tok_last = time.perf_counter(), self.tokens
        self.model.train()
        with progress(self.step, end, a.progress) as bar:
            try:
                while self.step < end:
                    if _STOP.is_set():
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    loss, norm = self.train_step()
                    self.wall += time.perf_counter() - t0
                    check_finite(loss, self.step, self.saved, self.out)
                    now = time.perf_counter()
                    tok_s = (self.tokens - tok_last) / max(now - t_last, 1e-9)
                    self._record({"step": self.step, "loss": round(loss, 6), "grad_norm": round(norm, 6),
                                  "lr": self.opt.param_groups[0]["lr"], "tokens": self.tokens,
                                  "wall_time_s": round(self.wall, 3)})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    if a.log_every and self.step % a.log_every == 0:
                        log.info("step %d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s", self.step, loss, norm,
                                 self.opt.param_groups[0]["lr"], tok_s)
                        t_last, tok_last = now, self.tokens
                    if self.step % a.eval_every == 0 or self.step == a.steps:
                        t0 = time.perf_counter()
                        self._validate_and_save()
                        t_last += time.perf_counter() - t0  # the next tokens/s leaves this pause out
            except KeyboardInterrupt:
                log.warning("interrupted at step %d: saving a resumable checkpoint", self.step)
                self.save()
                raise
        if self.step % a.eval_every and self.step != a.steps:
            self.save()  # stopped by --stop-at between validations
        return self.val_loss

    def _validate_and_save(self) -> None:
        """The periodic pass (calibration first at the last step; the whole split then), logged, then ckpt.pt."""
        t0 = time.perf_counter()
        last = self.step == self.args.steps
        if last and self.calib_ids is not None:
            self.calibrate()
        sample = self.validate(whole=last)
        spent = time.perf_counter() - t0
        self.wall += spent
        if self.val_loss is not None and self.val_loss != sample:
            log.info("step %d val_loss %.4f on all %d held-out chars, %.4f on the first %d (%.1f s)", self.step,
                     self.val_loss, self._scored(self.val_ids), sample, self.val_sample_chars, spent)
        else:
            log.info("step %d val_loss%s %.4f (%d held-out chars, %.1f s)", self.step,
                     "" if self.val_loss is not None else "_sample", sample, self.val_sample_chars, spent)
        self.save()


SETUP_ERRORS = (TrainError, CorpusError, SeriesError, checkpoint.CheckpointError)  # exit 2: before any training
RUN_ERRORS = (RunError, OSError, RuntimeError, MemoryError, ValueError)  # exit 1: the started run failed


def _one_line(e: BaseException) -> str:
    """An exception as one line: our errors by their message, others with their type (torch's run long)."""
    if isinstance(e, RunError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _train(argv: list[str] | None) -> int:
    """Set up (errors: exit 2), train (errors: exit 1; interrupted: 130), print the result as JSON (0)."""
    try:
        args, raw, level = parse_args(argv)
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        run: Any = _series_run(args, raw) if args.series else _text_run(args, raw)
    except SETUP_ERRORS as e:
        print(f"rnn-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RUN_ERRORS as e:  # torch or the system failed while building the run (a model too big to allocate)
        log.debug("setting up the run failed", exc_info=True)
        hint = ("; --hidden, --layers, --embed or --batch may be too large for this machine"
                if isinstance(e, MemoryError) or "allocate" in str(e) else "")
        print(f"rnn-train: error: {_one_line(e)} (while setting up the run, before step 1{hint}; --log-level "
              "DEBUG shows the traceback)", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # outside the main thread (no signal handler): before training, nothing saved
        print("rnn-train: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        metrics = run.run()
    except KeyboardInterrupt:
        sys.stderr.flush()
        print(f"rnn-train: interrupted at step {run.step}; the checkpoint is resumable: "
              f"`rnn-train --resume {run.out / 'ckpt.pt'}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RUN_ERRORS as e:
        log.debug("the run failed at step %d", run.step, exc_info=True)
        hint = "" if isinstance(e, RunError) else f" (after step {run.step}; --log-level DEBUG shows the traceback)"
        print(f"rnn-train: error: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR
    summary = metrics if isinstance(metrics, dict) else {
        "val_loss": metrics, "val_loss_sample": run.val_loss_sample, "val_sample_chars": run.val_sample_chars}
    print(json.dumps({"checkpoint": str(run.out / "ckpt.pt"), "steps": run.step, **summary,
                      "wall_time_s": round(run.wall, 1)}))
    return EXIT_OK


def _text_run(args: TrainArgs, raw: dict[str, Any] | None) -> Run:
    run = Run(args, raw)
    log.info("model %s: %d parameters, state_size %d, vocab %d; %d train / %d val chars on %s",
             run.config.to_dict(), sum(p.numel() for p in run.params), run.model.state_size,
             len(run.vocab), len(run.train_ids), len(run.val_ids), run.device)
    return run


def _series_run(args: TrainArgs, raw: dict[str, Any] | None) -> Any:
    """rnn-train --series: a SeriesRun, set up."""
    from .series_train import SeriesRun  # imports this module: loaded only for sequence runs

    run = SeriesRun(args, raw)
    log.info("series model %s: %d parameters, state_size %d; %d train / %d val sequences, %d features on %s",
             run.config.to_dict(), sum(p.numel() for p in run.params), run.model.state_size, len(run.train_set),
             0 if run.val_set is None else len(run.val_set), run.config.features, run.device)
    return run


def main(argv: list[str] | None = None) -> int:
    """Console entry point: train, print the final validation loss; clear errors, no traceback.

    SIGTERM and Ctrl-C stop between steps and save a resumable checkpoint.
    """
    def _stop(_signum: int, _frame: Any) -> None:
        _STOP.set()  # finish the current step, then checkpoint and exit

    _STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        return _train(argv)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
