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
Writes are atomic (temporary file, then rename), so a crash never leaves half a checkpoint. Reads check the
file before torch.load sees it (torch answers a cut-short file with `OSError: [Errno 22]` and reads a
flipped bit without complaint): missing, a directory, empty, not a torch archive, cut short, a member failing
its CRC-32, another tool's torch file, a newer format each raise a CheckpointError naming the file.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
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


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (a zip file); rnn-train never wrote anything else
TRAIN_KEYS = ("optimizer", "scheduler", "rng", "position", "carry", "step", "data_sha256", "args")


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read: truncated or not a checkpoint ({why})")


def _first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: message`, cut to its first sentence: torch's loader errors run to several lines of advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_archive(path: Path) -> None:
    """Fail with a CheckpointError naming the damage unless `path` is a whole zip archive (torch's format):
    not empty, not cut short, every member matching its CRC-32 (torch.load itself checks none of this)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
            size = f.seek(0, os.SEEK_END)
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise _unreadable(path, "an empty file, 0 bytes")
    if head != ZIP_MAGIC:
        what = "a Python pickle" if head[:1] == b"\x80" else f"it starts with {head!r}"
        raise _unreadable(path, f"not a torch archive: {what}")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # written without CRCs (torch's compute_crc32 off)
                    continue
                with z.open(info) as member:
                    while member.read(1 << 20):  # zipfile checks the CRC-32 at the end of each member
                        pass
    except zipfile.BadZipFile as e:
        if "not a zip file" in str(e):  # no end-of-archive directory: the file was cut short
            raise _unreadable(path, f"a torch archive cut short at {size:,} bytes: its directory is missing") \
                from None
        raise CheckpointError(f"checkpoint {path} cannot be read: damaged ({e}); it was modified or copied "
                              "incompletely") from None
    except (OSError, EOFError, ValueError, NotImplementedError) as e:  # unsupported or mangled member headers
        raise CheckpointError(f"checkpoint {path} cannot be read: damaged (a mangled member header: "
                              f"{_first_line(e)}); it was modified or copied incompletely") from None


def _foreign(path: Path, raw: Any) -> CheckpointError | None:
    """None if `raw` is this version's checkpoint dict, else an error saying what the file holds instead."""
    if not isinstance(raw, dict):
        return CheckpointError(f"checkpoint {path} is not an rnnserve checkpoint: a torch file holding a "
                               f"{type(raw).__name__}, written by another tool")
    fmt = raw.get("format")
    if fmt == FORMAT:
        return None
    prefix = FORMAT.rsplit("/", 1)[0] + "/"
    if isinstance(fmt, str) and fmt.startswith(prefix):
        newer = fmt[len(prefix):].isdigit() and int(fmt[len(prefix):]) > int(FORMAT.rsplit("/", 1)[1])
        return CheckpointError(f"checkpoint {path} was written by {'a newer' if newer else 'another'} rnnserve "
                               f"(format {fmt!r}; this one reads {FORMAT!r})")
    if fmt is not None:
        return CheckpointError(f"checkpoint {path} was written by another tool (format {fmt!r}, not {FORMAT!r})")
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        held = f"a bare state_dict of {len(raw)} tensor{'s' if len(raw) != 1 else ''}"
    else:
        held = f"a dict of {sorted(map(str, raw))[:6]}"
    return CheckpointError(f"checkpoint {path} is not an rnnserve checkpoint: {held} without format {FORMAT!r}, "
                           "written by another tool")


def read(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict, with an error that names the file and what is wrong with it (missing, a
    directory, empty, cut short, damaged, another tool's file, a newer format) instead of torch's."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:  # pickled classes this installation does not have
        raise CheckpointError(f"checkpoint {path} cannot be read: written by another tool or version "
                              f"({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise _unreadable(path, f"torch.load: {_first_line(e)}") from None
    problem = _foreign(path, raw)
    if problem is not None:
        raise problem
    for key in ("config", "vocab", "model"):
        if key not in raw:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return raw


def training_state(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The `train` record --resume needs, checked: an error names the checkpoint and the missing part."""
    train = raw.get("train")
    if not isinstance(train, dict) or not train:
        raise CheckpointError(f"checkpoint {path} holds no training state (exported or stripped): cannot resume")
    needed = TRAIN_KEYS + (("offset",) if raw.get("kind") == "series" else ())
    missing = [k for k in needed if k not in train]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: its training state lacks {missing} "
                              "(written by another version of rnn-train)")
    return train


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
