"""Shared fixtures: a small built-in text and a model repository made with the real export.

`tiny_repo` (session scope, read-only: copy it before changing anything) holds
    tiny/1       elman, H=32, 1 layer, learned initial state (seeded, non-zero)
    tiny-lstm/1  lstm,  H=16, 2 layers
    tiny-gru/1   gru,   H=16, 1 layer
all over the vocabulary of `tiny_text`. The models are seeded random (untrained) weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_TEXT = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?

All:
No more talking on't; let it be done: away, away!

Second Citizen:
One word, good citizens.
"""

# (name, cell, hidden_size, layers, init_state, seed)
TINY_MODELS = (
    ("tiny", "elman", 32, 1, "learned", 1),
    ("tiny-lstm", "lstm", 16, 2, "zeros", 2),
    ("tiny-gru", "gru", 16, 1, "zeros", 3),
)


def tiny_model(cell: str, hidden: int, layers: int, init_state: str, seed: int, vocab_size: int):
    """A seeded random RNNModel; a learned initial state gets non-zero values so it matters."""
    import torch

    from trainer.model import ModelConfig, RNNModel

    torch.manual_seed(seed)
    model = RNNModel(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=hidden, layers=layers,
                                 embed_size=8, init_state=init_state))
    if init_state == "learned":
        with torch.no_grad():
            model.h0.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """The small built-in text whose characters form the tiny models' vocabulary."""
    return TINY_TEXT


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny/1, tiny-lstm/1 and tiny-gru/1, made by trainer.export."""
    from trainer.export import export_model

    repo = tmp_path_factory.mktemp("tiny-repo")
    vocab = sorted(set(TINY_TEXT))
    for name, cell, hidden, layers, init_state, seed in TINY_MODELS:
        model = tiny_model(cell, hidden, layers, init_state, seed, len(vocab))
        export_model(model, vocab, repo, name, version=1, eval_text=TINY_TEXT,
                     metrics={"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0},
                     source={"fixture": "tests/conftest.py"})
    return repo
