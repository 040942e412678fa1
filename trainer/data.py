"""Corpus, character vocabulary, and the batches of truncated back-propagation through time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class CorpusError(ValueError):
    """A corpus that cannot be trained on (missing, not UTF-8, too short)."""


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with an error that names the problem."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus {p} does not exist")
    if p.is_dir():
        raise CorpusError(f"corpus {p} is a directory, not a text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {p} is not valid UTF-8 (byte {e.start}): {e.reason}") from None
    except OSError as e:
        raise CorpusError(f"corpus {p} cannot be read: {e.strerror or e}") from None
    if len(text) < 2:
        raise CorpusError(f"corpus {p} has {len(text)} characters; need at least 2")
    return text


@dataclass(frozen=True)
class Vocab:
    """Characters in sorted order; a token id is a character's index."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The sorted set of characters in text."""
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        """char -> id."""
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        """Text -> int64 ids; a character outside the vocabulary raises KeyError naming it."""
        idx = self.index
        try:
            return np.fromiter((idx[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise KeyError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """Ids -> text."""
        return "".join(self.chars[int(i)] for i in ids)


def split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Train on the head, validate on the last `val_fraction` of the corpus."""
    n_val = max(2, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise CorpusError(f"corpus of {len(ids)} tokens is too short to split {val_fraction:.0%} off")
    return ids[:-n_val], ids[-n_val:]


class StreamBatches:
    """B parallel streams over the data, read in consecutive chunks of T tokens.

    Stream b reads the b-th contiguous slice of the data, so chunk k+1 of a stream
    continues chunk k and the caller can carry the (detached) state across chunks.
    `position` counts chunks served; setting it resumes exactly where a run stopped.
    With `shift_seed`, every epoch after the first rotates the data by an offset drawn
    from (shift_seed, epoch), so later epochs see new chunk boundaries and stream
    pairings instead of the same batches again; epoch 0 and shift_seed=None are unshifted.
    """

    def __init__(self, ids: np.ndarray, batch: int, seq_len: int, shift_seed: int | None = None) -> None:
        length = (len(ids) - 1) // batch  # tokens per stream (inputs); targets are shifted by one
        if length < seq_len:
            raise CorpusError(
                f"{len(ids)} training tokens cannot fill --batch {batch} streams of one --seq-len {seq_len}-token "
                "chunk each: lower them or give a longer corpus"
            )
        self.batch, self.seq_len, self.length, self.shift_seed = batch, seq_len, length, shift_seed
        self.chunks_per_epoch = length // seq_len
        self.data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        self._epoch = -1
        self.streams = self._streams(0)  # (B, L+1)
        self.position = 0

    def offset(self, epoch: int) -> int:
        """Rotation of the data in this epoch (0 without shift_seed and in epoch 0)."""
        if self.shift_seed is None or epoch == 0:
            return 0
        return int(np.random.default_rng([self.shift_seed, epoch]).integers(len(self.data)))

    def _streams(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            usable = self.chunks_per_epoch * self.seq_len
            starts = torch.arange(self.batch) * self.length + self.offset(epoch)  # (B,)
            offs = torch.arange(usable + 1)  # (L+1,)
            self.streams = self.data[(starts[:, None] + offs[None, :]) % len(self.data)]  # (B, L+1)
            self._epoch = epoch
        return self.streams

    def chunk(self, k: int) -> tuple[Tensor, Tensor, bool]:
        """Chunk k: inputs (B, T), targets (B, T), and whether it starts an epoch (reset state)."""
        epoch, j = divmod(k, self.chunks_per_epoch)
        streams = self._streams(epoch)
        s = j * self.seq_len
        x = streams[:, s : s + self.seq_len]
        y = streams[:, s + 1 : s + 1 + self.seq_len]
        return x, y, j == 0

    def next(self) -> tuple[Tensor, Tensor, bool]:
        """The next chunk in order."""
        out = self.chunk(self.position)
        self.position += 1
        return out
