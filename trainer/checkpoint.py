"""Checkpoint files: weights, config, vocab, optimizer state and metrics in one torch file.

Format (a dict saved with torch.save), key `format` = FORMAT:
    config     ModelConfig.to_dict()
    vocab      list[str], a token id is its index
    model      the model's state_dict
    metrics    {"val_loss": float | None, "steps": int, "tokens": int, "wall_time_s": float}
    train      everything train.py needs to resume exactly (optimizer, scheduler, rng, position, args)
A sequence model's checkpoint (rnn-train --series) also has `kind` = "series", its config is a
SeriesConfig, `vocab` is [] and `series` holds what the export needs besides the weights:
    series     {"features": names, "mean": [F], "std": [F], "classes": names, "labels": "sequence" | "step"
                | None, "horizon": H | None}
Writes are atomic (temporary file, then rename), so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .model import ModelConfig, RNNModel, SeriesConfig, SeriesModel

FORMAT = "rnnserve-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not ours."""


@dataclass
class Loaded:
    """A checkpoint turned back into a model, ready for export or evaluation."""

    model: RNNModel | SeriesModel
    config: ModelConfig | SeriesConfig
    vocab: list[str]
    metrics: dict[str, Any]
    raw: dict[str, Any]
    series: dict[str, Any] | None = None  # a sequence model's features, normalisation, classes

    @property
    def is_series(self) -> bool:
        """Whether this is a sequence model (rnn-train --series) rather than a text model."""
        return self.series is not None


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write a checkpoint dict (FORMAT is added)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict, with an error that names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an rnnserve checkpoint (expected format {FORMAT!r})")
    for key in ("config", "vocab", "model"):
        if key not in raw:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return raw


def load(path: str | Path) -> Loaded:
    """Read a checkpoint and rebuild its model in eval mode on the CPU."""
    raw = read(path)
    series = raw.get("series") if raw.get("kind") == "series" else None
    if raw.get("kind") == "series" and not isinstance(series, dict):
        raise CheckpointError(f"checkpoint {path} is a series checkpoint without its 'series' record")
    try:
        config = SeriesConfig(**raw["config"]) if series is not None else ModelConfig(**raw["config"])
        model = SeriesModel(config) if series is not None else RNNModel(config)
        model.load_state_dict(raw["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit its own config: {e}") from None
    if series is not None:
        model.eval()
        return Loaded(model, config, [], dict(raw.get("metrics") or {}), raw, dict(series))
    if len(raw["vocab"]) != config.vocab_size:
        raise CheckpointError(
            f"checkpoint {path}: vocab has {len(raw['vocab'])} entries, config says {config.vocab_size}"
        )
    model.eval()
    return Loaded(model, config, list(raw["vocab"]), dict(raw.get("metrics") or {}), raw)
