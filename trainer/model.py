"""The character model: embedding -> stacked cells -> linear head, with initial-state modes."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .cells import CELL_KINDS, Cell, make_cell

INIT_MODES = ("zeros", "learned")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved with its weights."""

    vocab_size: int
    cell: str = "elman"
    hidden_size: int = 512
    layers: int = 1
    embed_size: int = 64
    dropout: float = 0.0  # between stacked layers, training only
    init_state: str = "zeros"  # "zeros" or "learned"; a caller-given vector is passed to forward
    out_dropout: float = 0.0  # on the top layer's output before the head, training only
    weight_drop: float = 0.0  # DropConnect on every layer's W_h, training only

    def __post_init__(self) -> None:
        if self.cell not in CELL_KINDS:
            raise ValueError(f"unknown cell {self.cell!r}: expected one of {', '.join(CELL_KINDS)}")
        if self.init_state not in INIT_MODES:
            raise ValueError(f"unknown init_state {self.init_state!r}: expected one of {INIT_MODES}")
        for name in ("vocab_size", "hidden_size", "layers", "embed_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "out_dropout", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """Plain dict for checkpoints and model.json."""
        return asdict(self)


class RNNModel(nn.Module):
    """Char-level recurrent language model over an opaque, concatenated state vector."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        sizes = [config.embed_size] + [config.hidden_size] * (config.layers - 1)
        self.cells = nn.ModuleList(make_cell(config.cell, i, config.hidden_size) for i in sizes)
        for cell in self.cells:
            cell.weight_drop = config.weight_drop
        self.drop = nn.Dropout(config.dropout)
        self.out_drop = nn.Dropout(config.out_dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.state_sizes = [c.state_size for c in self.cells]
        if config.init_state == "learned":
            self.h0 = nn.Parameter(torch.zeros(self.state_size))
        else:
            self.register_buffer("h0", torch.zeros(self.state_size))

    @property
    def state_size(self) -> int:
        """Length of the whole model's state vector (all layers concatenated)."""
        return sum(self.state_sizes)

    def initial_state(self, batch: int, given: Tensor | None = None) -> Tensor:
        """The state a new sequence starts from: (B, S). `given` (S,) or (B, S) overrides the mode."""
        if given is not None:
            given = given.to(self.h0)
            if given.shape[-1] != self.state_size:
                raise ValueError(f"state has length {given.shape[-1]}, expected {self.state_size}")
            return given.expand(batch, self.state_size) if given.dim() == 1 else given
        return self.h0.unsqueeze(0).expand(batch, self.state_size)

    def split_state(self, state: Tensor) -> list[Tensor]:
        """(B, S) -> one (B, S_l) block per layer."""
        return list(torch.split(state, self.state_sizes, dim=-1))

    def forward_inputs(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Float inputs: x (B, T, E), state (B, S) -> top hidden states (B, T, H), state (B, S)."""
        out = []
        for layer, (cell, s) in enumerate(zip(self.cells, self.split_state(state))):
            if layer > 0:
                x = self.drop(x)
            x, s = cell(x, s)  # (B, T, H), (B, S_l)
            out.append(s)
        return x, torch.cat(out, dim=-1)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids (B, T) and state (B, S) or None -> logits (B, T, V), state (B, S)."""
        if state is None:
            state = self.initial_state(tokens.shape[0])
        hs, state = self.forward_inputs(self.embed(tokens), state)  # (B, T, H)
        return self.head(self.out_drop(hs)), state  # (B, T, V)

    def step(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step, the contract of model.onnx: tokens (B,), state (B, S) -> logits (B, V), state."""
        x = self.embed(tokens)  # (B, E)
        out = []
        for cell, s in zip(self.cells, self.split_state(state)):
            x, s = cell.step(x, s)  # (B, H)
            out.append(s)
        return self.head(x), torch.cat(out, dim=-1)

    @property
    def layer_cells(self) -> list[Cell]:
        """The stacked cells, bottom first."""
        return list(self.cells)
