"""What every rnn-train loop shares (text and sequence runs): the schedule, clipping, RNG state, device, stop flag."""
from __future__ import annotations

import math
import random
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .args import TrainArgs, TrainError

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
    """--device checked: cpu, or cuda where torch has a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but CUDA is not available (torch has no usable GPU)")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda, got {name!r}")
    return name
