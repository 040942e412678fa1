"""The models: stacked cells over one opaque state vector, with initial-state modes.

RNNModel reads token ids (embedding -> cells -> head: the character language model); SeriesModel reads
float frames (normalisation -> cells -> head: sequence classification or next-frame forecasting).
"""
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


class StateStack:
    """Stacked cells over one concatenated state vector: what RNNModel and SeriesModel share.

    The class using it sets `cells` (nn.ModuleList of Cell), `state_sizes`, `drop` and the `h0` buffer or parameter.
    """

    cells: nn.ModuleList
    state_sizes: list[int]
    drop: nn.Dropout
    h0: Tensor

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

    @property
    def layer_cells(self) -> list[Cell]:
        """The stacked cells, bottom first."""
        return list(self.cells)


class RNNModel(StateStack, nn.Module):
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


TASK_KINDS = ("classify", "forecast")
FORECAST_LOSSES = ("nll", "mse")  # Gaussian negative log-likelihood (mean and log-variance) or squared error


@dataclass(frozen=True)
class SeriesConfig:
    """Everything needed to rebuild a SeriesModel (numeric frames in); saved with its weights."""

    features: int
    task: str = "classify"  # "classify" (class logits out) or "forecast" (the next frame out)
    classes: int = 2  # classify: the number of classes
    loss: str = "nll"  # forecast: "nll" (outputs mean and log-variance) or "mse" (mean only)
    cell: str = "gru"
    hidden_size: int = 64
    layers: int = 1
    dropout: float = 0.0
    init_state: str = "zeros"
    out_dropout: float = 0.0
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            raise ValueError(f"unknown task {self.task!r}: expected one of {', '.join(TASK_KINDS)}")
        if self.loss not in FORECAST_LOSSES:
            raise ValueError(f"unknown forecast loss {self.loss!r}: expected one of {', '.join(FORECAST_LOSSES)}")
        if self.task == "classify" and self.classes < 2:
            raise ValueError(f"a classifier needs 2 or more classes, got {self.classes}")
        ModelConfig(vocab_size=1, cell=self.cell, hidden_size=self.hidden_size, layers=self.layers,
                    embed_size=self.features, dropout=self.dropout, init_state=self.init_state,
                    out_dropout=self.out_dropout, weight_drop=self.weight_drop)  # the shared checks

    @property
    def output_size(self) -> int:
        """Width O of the head: class logits, or F means (and F log-variances with the nll loss)."""
        if self.task == "classify":
            return self.classes
        return self.features * (2 if self.loss == "nll" else 1)

    def to_dict(self) -> dict:
        """Plain dict for checkpoints."""
        return asdict(self)


class SeriesModel(StateStack, nn.Module):
    """Float frames -> (x - mean) / std -> stacked cells -> linear head, for classification or forecasting.

    The head works in normalised units; `forward` and `step` return what the ONNX graphs return: class
    logits, or the forecast of the next frame in raw units (mean * std + mean_x, log_var + 2 log std).
    `scores` is the head's own output, which the training losses read.
    """

    def __init__(self, config: SeriesConfig) -> None:
        super().__init__()
        self.config = config
        F, H, O = config.features, config.hidden_size, config.output_size
        sizes = [F] + [H] * (config.layers - 1)
        self.cells = nn.ModuleList(make_cell(config.cell, i, H) for i in sizes)
        for cell in self.cells:
            cell.weight_drop = config.weight_drop
        self.drop = nn.Dropout(config.dropout)
        self.out_drop = nn.Dropout(config.out_dropout)
        self.head = nn.Linear(H, O)
        self.state_sizes = [c.state_size for c in self.cells]
        if config.init_state == "learned":
            self.h0 = nn.Parameter(torch.zeros(self.state_size))
        else:
            self.register_buffer("h0", torch.zeros(self.state_size))
        self.register_buffer("in_mean", torch.zeros(F))
        self.register_buffer("in_std", torch.ones(F))
        self.register_buffer("out_scale", torch.ones(O))  # forecast: outputs = scores * out_scale + out_shift
        self.register_buffer("out_shift", torch.zeros(O))

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Per-feature mean and std (F,) of the training frames; fixes the output de-normalisation too."""
        F = self.config.features
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (F,) or std.shape != (F,) or not bool((std > 0).all()):
            raise ValueError(f"normalisation must be {F} means and {F} positive stds")
        with torch.no_grad():
            self.in_mean.copy_(mean)
            self.in_std.copy_(std)
            if self.config.task == "forecast":
                self.out_scale[:F] = std
                self.out_shift[:F] = mean
                if self.config.loss == "nll":  # log Var(std z + mean) = log Var(z) + 2 log std
                    self.out_shift[F:] = 2.0 * torch.log(std)

    def normalize(self, x: Tensor) -> Tensor:
        """Raw frames (..., F) -> normalised frames."""
        return (x - self.in_mean) / self.in_std

    def denormalize(self, scores: Tensor) -> Tensor:
        """Head output (..., O) -> the contract's outputs (identity for a classifier)."""
        return scores if self.config.task == "classify" else scores * self.out_scale + self.out_shift

    def scores(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw frames (B, T, F), state (B, S) or None -> head output in normalised units (B, T, O), state."""
        if state is None:
            state = self.initial_state(x.shape[0])
        hs, state = self.forward_inputs(self.normalize(x), state)  # (B, T, H)
        return self.head(self.out_drop(hs)), state

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """sequence.onnx's contract: raw frames (B, T, F), state -> outputs (B, T, O), state (B, S)."""
        scores, state = self.scores(x, state)
        return self.denormalize(scores), state

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """model.onnx's contract: one raw frame (B, F), state (B, S) -> outputs (B, O), state (B, S)."""
        h = self.normalize(x)
        out = []
        for cell, s in zip(self.cells, self.split_state(state)):
            h, s = cell.step(h, s)  # (B, H)
            out.append(s)
        return self.denormalize(self.head(h)), torch.cat(out, dim=-1)

