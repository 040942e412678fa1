"""rnn-train: char-level language-model training with truncated BPTT, checkpoints and exact resume.

Loss: the per-step cross-entropy summed over time (`sequence_loss`); the step optimises the same
objective scaled to the mean per character, so `--clip` thresholds mean what they do for nn.RNN users.
Validation runs ONE stream over the held-out last 10% from the model's initial state (the same
measurement the export reports from onnxruntime); `--val-streams N` trades that for speed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer import checkpoint
from trainer.cells import CELL_KINDS
from trainer.data import CorpusError, StreamBatches, Vocab, load_text, split
from trainer.model import INIT_MODES, ModelConfig, RNNModel
from trainer.report import append_row, evaluate, load_history, plot_losses, progress_bar, sequence_loss

log = logging.getLogger(__name__)

# Flags that shape the model, the data or the optimisation: fixed by the checkpoint on --resume.
FIXED_ON_RESUME = ("cell", "hidden", "layers", "embed", "dropout", "out_dropout", "weight_drop", "shift_epochs",
                   "init_state", "batch", "seq_len",
                   "lr", "schedule", "warmup", "clip", "seed", "steps")


_STOP = threading.Event()  # set by SIGTERM/SIGINT; the loop stops between steps, so state stays whole


class TrainError(ValueError):
    """Bad input to the trainer, reported on stderr without a traceback."""


@dataclass(frozen=True)
class TrainArgs:
    """Every training setting, parsed once."""

    data: str | None = None
    out: str = "runs/default"
    cell: str = "elman"
    hidden: int = 512
    layers: int = 1
    embed: int = 64
    dropout: float = 0.0
    out_dropout: float = 0.0
    weight_drop: float = 0.0
    shift_epochs: bool = False
    init_state: str = "zeros"
    batch: int = 32
    seq_len: int = 128
    steps: int = 3000
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup: int = 0
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 500
    val_streams: int = 1
    log_every: int = 100
    threads: int = 0
    device: str = "cpu"
    resume: str | None = None
    stop_at: int | None = None
    progress: bool = True


def lr_factor(step: int, args: TrainArgs) -> float:
    """Multiplier of --lr at optimiser step `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if args.warmup > 0 and step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(params: list[Tensor], clip: float) -> float:
    """Scale gradients so their global L2 norm is at most `clip` (<= 0: no clipping); return the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    return float(norm)


def _rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pick_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but CUDA is not available (torch has no usable GPU)")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda, got {name!r}")
    return name


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
        if args.val_streams < 1 or (len(self.val_ids) - 1) // args.val_streams < 1:
            raise TrainError(f"--val-streams {args.val_streams} does not fit {len(self.val_ids)} validation chars")
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
        self.step, self.wall, self.val_loss = 0, 0.0, None
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
            self.carry = None if tr["carry"] is None else tr["carry"].to(self.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.history = load_history(self.out / "metrics.jsonl", self.step)

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

    def validate(self) -> float:
        """Held-out loss, recorded."""
        self.val_loss = evaluate(self.model, self.val_ids, self.args.val_streams, device=self.device)
        self._record({"step": self.step, "val_loss": self.val_loss, "tokens": self.tokens,
                      "wall_time_s": round(self.wall, 3)})
        return self.val_loss

    def save(self) -> Path:
        """Write ckpt.pt and loss.png beside metrics.jsonl."""
        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        payload = {
            "config": self.config.to_dict(),
            "vocab": list(self.vocab.chars),
            "model": model,
            "metrics": {"val_loss": self.val_loss, "steps": self.step, "tokens": self.tokens,
                        "wall_time_s": round(self.wall, 3)},
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
        plot_losses(self.history, self.out / "loss.png")
        return path

    def run(self) -> float | None:
        """Train to --steps (or --stop-at), validating and checkpointing every --eval-every steps."""
        a = self.args
        end = a.steps if a.stop_at is None else min(a.steps, a.stop_at)
        bar = progress_bar(self.step, end, a.progress)
        t_last, tok_last = time.perf_counter(), self.tokens
        self.model.train()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                self.wall += time.perf_counter() - t0
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
                    val = self.validate()
                    self.wall += time.perf_counter() - t0
                    log.info("step %d val_loss %.4f", self.step, val)
                    self.save()
                if _STOP.is_set():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a resumable checkpoint", self.step)
            self.save()
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.step % a.eval_every and self.step != a.steps:
            self.save()  # stopped by --stop-at between validations
        return self.val_loss


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The rnn-train CLI; with suppress=True, unset flags are absent (to see what was given)."""
    d = TrainArgs()

    def dflt(v):
        return argparse.SUPPRESS if suppress else v

    p = argparse.ArgumentParser(prog="rnn-train", description="Train a char-level RNN on a UTF-8 text file.",
                                argument_default=argparse.SUPPRESS if suppress else None)
    p.add_argument("--data", default=dflt(None), help="UTF-8 text corpus (required unless --resume)")
    p.add_argument("--out", default=dflt(None), help="run folder for ckpt.pt, metrics.jsonl, loss.png "
                   "(default runs/default, or the resumed checkpoint's folder)")
    p.add_argument("--cell", choices=CELL_KINDS, default=dflt(d.cell))
    p.add_argument("--hidden", type=int, default=dflt(d.hidden), help="hidden size H")
    p.add_argument("--layers", type=int, default=dflt(d.layers))
    p.add_argument("--embed", type=int, default=dflt(d.embed), help="embedding size")
    p.add_argument("--dropout", type=float, default=dflt(d.dropout), help="between stacked layers")
    p.add_argument("--out-dropout", type=float, default=dflt(d.out_dropout),
                   help="dropout on the top layer's output before the head")
    p.add_argument("--weight-drop", type=float, default=dflt(d.weight_drop),
                   help="DropConnect on the recurrent weights W_h (one mask per chunk)")
    p.add_argument("--shift-epochs", action="store_true", default=dflt(False),
                   help="rotate the training data by a seeded offset each epoch (new chunk boundaries)")
    p.add_argument("--init-state", choices=INIT_MODES, default=dflt(d.init_state))
    p.add_argument("--batch", type=int, default=dflt(d.batch), help="parallel streams B")
    p.add_argument("--seq-len", type=int, default=dflt(d.seq_len), help="TBPTT chunk length T")
    p.add_argument("--steps", type=int, default=dflt(d.steps), help="total optimiser steps")
    p.add_argument("--lr", type=float, default=dflt(d.lr), help="peak learning rate (Adam)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=dflt(d.schedule))
    p.add_argument("--warmup", type=int, default=dflt(d.warmup), help="linear warmup steps")
    p.add_argument("--clip", type=float, default=dflt(d.clip), help="max gradient norm (<= 0: off)")
    p.add_argument("--seed", type=int, default=dflt(d.seed))
    p.add_argument("--eval-every", type=int, default=dflt(d.eval_every),
                   help="validate and checkpoint every N steps")
    p.add_argument("--val-streams", type=int, default=dflt(d.val_streams),
                   help="validation streams from the initial state (1 = the exported metric)")
    p.add_argument("--log-every", type=int, default=dflt(d.log_every), help="log a line every N steps")
    p.add_argument("--threads", type=int, default=dflt(d.threads), help="torch threads (0 = torch default)")
    p.add_argument("--device", default=dflt(d.device), help="cpu or cuda")
    p.add_argument("--resume", default=dflt(None), help="continue exactly from a ckpt.pt")
    p.add_argument("--stop-at", type=int, default=dflt(None),
                   help="stop after this step (checkpointed), as if interrupted; resume later")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=dflt(True))
    p.add_argument("--log-level", default=dflt("INFO"))
    return p


def parse_args(argv: list[str] | None) -> tuple[TrainArgs, dict[str, Any] | None, str]:
    """CLI -> TrainArgs (merged with a resumed checkpoint's args), the checkpoint, the log level."""
    ns = vars(build_parser().parse_args(argv))
    given = vars(build_parser(suppress=True).parse_args(argv))
    level = ns.pop("log_level")
    raw = None
    if ns["resume"]:
        raw = checkpoint.read(ns["resume"])
        if "train" not in raw:
            raise TrainError(f"{ns['resume']} holds no training state (exported or stripped): cannot resume")
        saved = {**asdict(TrainArgs()), **raw["train"]["args"]}  # flags added since keep their defaults
        for k in FIXED_ON_RESUME:
            if k in given and given[k] != saved[k] and k != "steps":
                raise TrainError(f"--{k.replace('_', '-')} cannot change on --resume "
                                 f"(checkpoint has {saved[k]!r}, got {given[k]!r})")
        merged = {**saved, **{k: v for k, v in given.items() if k != "log_level"}}
        merged["resume"] = ns["resume"]
        if "out" not in given:
            merged["out"] = str(Path(ns["resume"]).parent)
        if "stop_at" not in given:
            merged["stop_at"] = None
        ns = merged
    if ns["out"] is None:
        ns["out"] = TrainArgs.out
    if not ns["data"]:
        raise TrainError("--data is required (a UTF-8 text file)")
    args = TrainArgs(**{f.name: ns[f.name] for f in fields(TrainArgs)})
    for name in ("hidden", "layers", "embed", "batch", "seq_len", "steps", "eval_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.lr <= 0:
        raise TrainError("--warmup must be >= 0 and --lr > 0")
    if raw is not None and raw["train"]["step"] >= args.steps:
        raise TrainError(f"checkpoint is already at step {raw['train']['step']} >= --steps {args.steps}")
    return args, raw, level


def _train(argv: list[str] | None) -> int:
    try:
        args, raw, level = parse_args(argv)
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        run = Run(args, raw)
        log.info("model %s: %d parameters, state_size %d, vocab %d; %d train / %d val chars",
                 run.config.to_dict(), sum(p.numel() for p in run.params), run.model.state_size,
                 len(run.vocab), len(run.train_ids), len(run.val_ids))
        val = run.run()
    except (TrainError, CorpusError, checkpoint.CheckpointError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"rnn-train: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnn-train: interrupted; the checkpoint is resumable with --resume", file=sys.stderr)
        return 130
    print(json.dumps({"checkpoint": str(run.out / "ckpt.pt"), "steps": run.step, "val_loss": val,
                      "wall_time_s": round(run.wall, 1)}))
    return 0


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
