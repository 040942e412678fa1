"""What every rnn-train loop shares (text and sequence runs): the schedule, clipping, RNG state, device, stop flag,
the divergence check."""
from __future__ import annotations

import logging
import math
import random
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .args import TrainArgs, TrainError

log = logging.getLogger(__name__)
STOP = threading.Event()  # set by SIGTERM/SIGINT; the loop stops between steps, so state stays whole


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


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch, numpy, Python, CUDA), for an exact resume."""
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(name: str) -> str:
    """--device resolved and checked: auto (cuda if torch sees a GPU, else cpu), cpu, cuda or cuda:N where
    torch sees that GPU; anything else is a TrainError naming --device (a usage error)."""
    if name == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("--device auto: %s (%s)", chosen, _gpus() if chosen == "cuda" else _no_gpu())
        return chosen
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if not index.isdigit() and index:
            raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name} was asked for but CUDA is not available ({_no_gpu()}); "
                             "--device auto falls back to the CPU")
        if index and int(index) >= torch.cuda.device_count():
            raise TrainError(f"--device {name}: torch sees {_gpus()}, so cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}")
        return name
    raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def _gpus() -> str:
    n = torch.cuda.device_count()
    return f"{n} GPU{'s' if n != 1 else ''}: {', '.join(torch.cuda.get_device_name(i) for i in range(n))}"


def _no_gpu() -> str:
    """Why torch has no GPU here, in words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"


class RunError(RuntimeError):
    """The run failed after it started (exit status 1): it diverged, or something it writes could not be written."""


def check_finite(loss: float, step: int, saved: int | None, out: Any) -> None:
    """Stop a diverged run before it overwrites the last good checkpoint: RunError if the loss is inf or nan."""
    if math.isfinite(loss):
        return
    kept = (f"{out}/ckpt.pt still holds step {saved}" if saved is not None
            else "no checkpoint was written")
    raise RunError(f"the training loss is {loss} at step {step}: the run diverged (try a lower --lr, a --clip, "
                   f"or --warmup); {kept}")
