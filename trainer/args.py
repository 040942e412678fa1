"""rnn-train's settings: the flags, parsed once into a frozen TrainArgs, merged with a resumed checkpoint's."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from . import checkpoint
from .cells import CELL_KINDS
from .model import INIT_MODES

# Flags that shape the model, the data or the optimisation: fixed by the checkpoint on --resume.
FIXED_ON_RESUME = ("cell", "hidden", "layers", "embed", "dropout", "out_dropout", "weight_drop", "shift_epochs",
                   "init_state", "calibrate", "batch", "seq_len",
                   "lr", "schedule", "warmup", "clip", "seed", "steps",
                   "series", "val", "task", "labels", "features", "val_fraction", "loss")
# Flags of one kind of run only: text (--data) or numeric sequences (--series).
TEXT_ONLY = ("data", "embed", "shift_epochs", "calibrate", "val_streams", "eval_chars")
SERIES_ONLY = ("series", "val", "test", "task", "labels", "features", "val_fraction", "horizon", "loss",
               "eval_sequences")
TASKS = ("classify", "forecast")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Validation passes score a fixed sample, sized so that a pass takes seconds on a 2-core CPU for the shipped
# models (README, --eval-chars): the first EVAL_CHARS characters of the held-out text, the first
# EVAL_SEQUENCES of the validation sequences spread evenly over them.
EVAL_CHARS = 10_000
EVAL_SEQUENCES = 1_000

# The exit status of every rnnserve command line (README "Exit status").
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS = ("exit status: 0 done; 1 the run failed after it started (diverged, a write failed); 2 usage "
               "error, before any training: a bad flag or value, or an input named by a flag that is missing "
               "or cannot be used (--data, --series, --val, --test, --resume); 130 interrupted (Ctrl-C or "
               "SIGTERM: a resumable checkpoint is saved)")


class TrainError(ValueError):
    """Bad input to the trainer (a flag, or a file a flag names), reported on stderr without a traceback."""


class _Help(argparse.HelpFormatter):
    """Help that ends each flag with its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or isinstance(action.default, bool)
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def count_or_all(what: str):
    """An argparse type: an integer >= 0, or `all` (returned as 0: no bound)."""
    def parse(text: str) -> int:
        if text.strip().lower() == "all":
            return 0
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of {what} >= 0 or 'all', got {text!r}") \
                from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be a number of {what} >= 0 or 'all', got {value}")
        return value
    return parse


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
    calibrate: float = 0.0
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
    eval_chars: int = EVAL_CHARS
    log_every: int = 100
    threads: int = 0
    device: str = "cpu"
    resume: str | None = None
    stop_at: int | None = None
    progress: bool = True
    series: str | None = None
    val: str | None = None
    test: str | None = None
    task: str = "classify"
    labels: str = "sequence"
    features: str | None = None
    val_fraction: float = 0.1
    horizon: int = 0
    loss: str = "nll"
    eval_sequences: int = EVAL_SEQUENCES


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The rnn-train CLI; with suppress=True, unset flags are absent (to see what was given)."""
    d = TrainArgs()

    def dflt(v):
        return argparse.SUPPRESS if suppress else v

    p = argparse.ArgumentParser(prog="rnn-train", description="Train a char-level RNN on a UTF-8 text file "
                                "(--data), or a sequence classifier or forecaster on numeric frames (--series).",
                                epilog=EXIT_STATUS, formatter_class=_Help,
                                argument_default=argparse.SUPPRESS if suppress else None)
    p.add_argument("--data", default=dflt(None), metavar="FILE",
                   help="UTF-8 text corpus (this or --series, unless --resume); its last 10%% is held out for "
                        "validation")
    p.add_argument("--out", default=dflt(None), metavar="DIR",
                   help=f"run folder for ckpt.pt, metrics.jsonl, loss.png (default: {d.out}, or the resumed "
                        "checkpoint's folder)")
    p.add_argument("--cell", choices=CELL_KINDS, default=dflt(d.cell), help="recurrent cell")
    p.add_argument("--hidden", type=int, default=dflt(d.hidden), help="hidden size H")
    p.add_argument("--layers", type=int, default=dflt(d.layers), help="stacked layers")
    p.add_argument("--embed", type=int, default=dflt(d.embed), help="embedding size")
    p.add_argument("--dropout", type=float, default=dflt(d.dropout),
                   help="dropout between stacked layers; 0 = off")
    p.add_argument("--out-dropout", type=float, default=dflt(d.out_dropout),
                   help="dropout on the top layer's output before the head; 0 = off")
    p.add_argument("--weight-drop", type=float, default=dflt(d.weight_drop),
                   help="DropConnect on the recurrent weights W_h, one mask per chunk; 0 = off")
    p.add_argument("--shift-epochs", action="store_true", default=dflt(False),
                   help="rotate the training data by a seeded offset each epoch (new chunk boundaries; "
                        "default: off)")
    p.add_argument("--init-state", choices=INIT_MODES, default=dflt(d.init_state), help="the initial state")
    p.add_argument("--calibrate", type=float, default=dflt(d.calibrate),
                   help="hold this fraction of the corpus' head out of training and fit a softmax "
                        "temperature on it at the last step, folded into the head; 0 = off")
    p.add_argument("--batch", type=int, default=dflt(d.batch), help="parallel streams B")
    p.add_argument("--seq-len", type=int, default=dflt(d.seq_len), help="TBPTT chunk length T")
    p.add_argument("--steps", type=int, default=dflt(d.steps), help="total optimiser steps")
    p.add_argument("--lr", type=float, default=dflt(d.lr), help="peak learning rate (Adam)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=dflt(d.schedule),
                   help="learning rate after the warmup")
    p.add_argument("--warmup", type=int, default=dflt(d.warmup), help="linear warmup steps; 0 = none")
    p.add_argument("--clip", type=float, default=dflt(d.clip), help="max gradient norm; <= 0 = no clipping")
    p.add_argument("--seed", type=int, default=dflt(d.seed), help="seed of every RNG the run draws from")
    p.add_argument("--eval-every", type=int, default=dflt(d.eval_every),
                   help="validate and checkpoint every N steps (and at the last)")
    p.add_argument("--val-streams", type=int, default=dflt(d.val_streams),
                   help="validation streams from the initial state; 1 = the exported metric")
    p.add_argument("--eval-chars", type=count_or_all("characters"), default=dflt(d.eval_chars), metavar="N",
                   help="score each validation pass on the first N characters of the held-out text, the "
                        "same ones every pass; the pass at --steps scores all of it; 0 or 'all' = all of it, "
                        "every pass")
    p.add_argument("--log-every", type=int, default=dflt(d.log_every),
                   help="log a line every N steps; 0 = never")
    p.add_argument("--threads", type=int, default=dflt(d.threads),
                   help="torch threads; 0 = as many as torch picks")
    p.add_argument("--device", default=dflt(d.device),
                   help="auto (cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--resume", default=dflt(None), metavar="CKPT", help="continue exactly from a ckpt.pt")
    p.add_argument("--stop-at", type=int, default=dflt(None), metavar="STEP",
                   help="stop after this step (checkpointed), as if interrupted; resume later")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=dflt(True),
                   help="no progress bar (default: a bar on stderr)")
    g = p.add_argument_group("numeric sequences (trainer/series.py describes the CSV and NPZ layouts)")
    g.add_argument("--series", default=dflt(None), metavar="FILE", help="training sequences, .csv or .npz")
    g.add_argument("--val", default=dflt(None), metavar="FILE",
                   help="validation sequences (default: --val-fraction of --series)")
    g.add_argument("--test", default=dflt(None), metavar="FILE",
                   help="test sequences, measured once at the last step")
    g.add_argument("--task", choices=TASKS, default=dflt(d.task),
                   help="classify the label column, or forecast the next frame")
    g.add_argument("--labels", choices=("sequence", "step"), default=dflt(d.labels),
                   help="classify: one label per sequence (read at its last step) or one per step")
    g.add_argument("--features", default=dflt(None), help="comma-separated feature columns (default: all)")
    g.add_argument("--val-fraction", type=float, default=dflt(d.val_fraction),
                   help="sequences held out of --series for validation when there is no --val; 0 = none")
    g.add_argument("--horizon", type=int, default=dflt(d.horizon),
                   help="forecast: also measure an H-step rollout against a last-value forecast; 0 = off")
    g.add_argument("--loss", choices=("nll", "mse"), default=dflt(d.loss),
                   help="forecast: Gaussian NLL with a predicted log-variance, or squared error of the mean")
    g.add_argument("--eval-sequences", type=count_or_all("sequences"), default=dflt(d.eval_sequences),
                   metavar="N", help="score each validation pass on N validation sequences spread evenly "
                   "over them, the same ones every pass; the pass at --steps scores all; 0 or 'all' = all, "
                   "every pass")
    p.add_argument("--log-level", default=dflt("INFO"), help="DEBUG, INFO, WARNING or ERROR")
    return p


def parse_args(argv: list[str] | None) -> tuple[TrainArgs, dict[str, Any] | None, str]:
    """CLI -> TrainArgs (merged with a resumed checkpoint's args), the checkpoint, the log level."""
    ns = vars(build_parser().parse_args(argv))
    given = vars(build_parser(suppress=True).parse_args(argv))
    level = ns.pop("log_level")
    raw = None
    if ns["resume"]:
        raw = checkpoint.read(ns["resume"])
        checkpoint.training_state(raw, ns["resume"])
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
    if bool(ns["data"]) == bool(ns["series"]):
        raise TrainError("give --data (a UTF-8 text file) or --series (numeric sequences), not both"
                         if ns["data"] else "--data is required (a UTF-8 text file), or --series (numeric sequences)")
    wrong = [k for k in (TEXT_ONLY if ns["series"] else SERIES_ONLY) if k in given and k not in ("data", "series")]
    if wrong:
        raise TrainError(f"--{wrong[0].replace('_', '-')} is for {'text' if ns['series'] else 'numeric sequence'} "
                         f"runs, not {'--series' if ns['series'] else '--data'}")
    args = TrainArgs(**{f.name: ns[f.name] for f in fields(TrainArgs)})
    if args.series and not (0.0 <= args.val_fraction < 1.0 and args.horizon >= 0):
        raise TrainError(f"--val-fraction must be in [0, 1) and --horizon >= 0, got {args.val_fraction}, "
                         f"{args.horizon}")
    for name in ("hidden", "layers", "embed", "batch", "seq_len", "steps", "eval_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or not (math.isfinite(args.lr) and args.lr > 0):
        raise TrainError(f"--warmup must be >= 0 and --lr a number > 0, got {args.warmup}, {args.lr}")
    for name in ("dropout", "out_dropout", "weight_drop"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise TrainError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("threads", "log_every"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.val_streams < 1 or not math.isfinite(args.clip):
        raise TrainError(f"--val-streams must be >= 1 and --clip a number, got {args.val_streams}, "
                         f"{args.clip}")
    if not 0 <= args.seed <= 2**32 - 1:  # numpy's seed range; torch's is wider
        raise TrainError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
    if args.stop_at is not None and args.stop_at < 1:
        raise TrainError(f"--stop-at must be a step >= 1, got {args.stop_at}")
    if not DEVICE.fullmatch(args.device):
        raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if not 0.0 <= args.calibrate <= 0.5:
        raise TrainError(f"--calibrate must be a fraction in [0, 0.5], got {args.calibrate}")
    if raw is not None and raw["train"]["step"] >= args.steps:
        raise TrainError(f"checkpoint is already at step {raw['train']['step']} >= --steps {args.steps}")
    return args, raw, level
