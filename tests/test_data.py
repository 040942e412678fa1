"""Corpus loading, vocabulary, the split from the end, and stream continuity across TBPTT chunks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rnnserve.trainer.data import CorpusError, StreamBatches, Vocab, load_text, split


def test_vocab_sorted_roundtrip() -> None:
    text = "hello, wörld\n"
    v = Vocab.from_text(text)
    assert v.chars == tuple(sorted(set(text))) and len(v) == len(set(text))
    ids = v.encode(text)
    assert ids.dtype == np.int64 and v.decode(ids) == text
    assert v.encode("o")[0] == v.chars.index("o")
    with pytest.raises(KeyError, match="'z' is not in the vocabulary"):
        v.encode("z")


def test_split_takes_validation_from_the_end() -> None:
    ids = np.arange(100)
    train, val = split(ids)
    assert len(val) == 10 and len(train) == 90
    assert np.array_equal(val, np.arange(90, 100)) and np.array_equal(train, np.arange(90))
    with pytest.raises(CorpusError, match="too short"):
        split(np.arange(3))


def test_streams_continue_across_chunks() -> None:
    ids = np.arange(1000)
    b = StreamBatches(ids, batch=4, seq_len=10)
    length = 999 // 4
    assert b.chunks_per_epoch == length // 10
    x0, y0, start0 = b.next()
    x1, _, start1 = b.next()
    assert start0 and not start1
    assert torch.equal(x0[:, 0], torch.arange(4) * length)  # stream b starts at b * length
    assert torch.equal(y0, x0 + 1) and torch.equal(x1[:, 0], x0[:, -1] + 1)  # chunk 1 continues chunk 0
    for _ in range(b.chunks_per_epoch - 2):
        b.next()
    x, _, start = b.next()  # a new epoch starts over
    assert start and torch.equal(x, x0)
    b.position = 1  # resuming at a position serves the same chunk
    assert torch.equal(b.next()[0], x1)


def test_streams_too_short() -> None:
    with pytest.raises(CorpusError, match="50 training tokens cannot fill --batch 8 streams of one --seq-len 10-token"):
        StreamBatches(np.arange(50), batch=8, seq_len=10)


def test_load_text_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        load_text(bad)
    short = tmp_path / "short.txt"
    short.write_text("a")
    with pytest.raises(CorpusError, match="1 characters"):
        load_text(short)
    with pytest.raises(CorpusError, match=f"corpus {tmp_path} is a directory, not a text file"):
        load_text(tmp_path)
    if Path("/proc/self/mem").exists():  # exists, but reading it from offset 0 fails (EIO)
        with pytest.raises(CorpusError, match="corpus /proc/self/mem cannot be read: Input/output error"):
            load_text("/proc/self/mem")
    good = tmp_path / "good.txt"
    good.write_text("Ünïcode ok\n", encoding="utf-8")
    assert load_text(good) == "Ünïcode ok\n"


def test_shifted_epochs_rotate_the_data_deterministically() -> None:
    ids = np.arange(1000)
    b = StreamBatches(ids, batch=4, seq_len=10, shift_seed=5)
    plain = StreamBatches(ids, batch=4, seq_len=10)
    n = b.chunks_per_epoch
    assert torch.equal(b.chunk(0)[0], plain.chunk(0)[0])  # epoch 0 is unshifted
    off = b.offset(1)
    assert 0 < off < 1000 and off == StreamBatches(ids, 4, 10, shift_seed=5).offset(1) != b.offset(2)
    x, y, start = b.chunk(n)  # first chunk of epoch 1
    assert start and torch.equal(x[:, 0], (torch.arange(4) * b.length + off) % 1000)
    assert torch.equal(y, (x + 1) % 1000)  # targets follow inputs (across the wrap too)
    x2, _, start2 = b.chunk(n + 1)
    assert not start2 and torch.equal(x2[:, 0], (x[:, -1] + 1) % 1000)  # streams still continue
    b.position = n + 1  # resuming inside a shifted epoch serves the same chunk
    assert torch.equal(b.next()[0], x2)
