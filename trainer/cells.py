"""Recurrent cells written from parameters: Elman, GRU and LSTM behind one interface.

Row-vector convention throughout (x @ W), as in the brief:
    Elman: h' = tanh(x W_x + b + h W_h)
    GRU:   r = s(x W_xr + b_xr + h W_hr + b_hr)
           z = s(x W_xz + b_xz + h W_hz + b_hz)
           n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn))
           h' = (1 - z) * n + z * h                         (gate order in W: r, z, n)
    LSTM:  i, f, g, o = split(x W_x + b + h W_h)            (gate order in W: i, f, g, o)
           c' = s(f) * c + s(i) * tanh(g);  h' = s(o) * tanh(c')
The state of a cell is one float vector per sequence: [h] for Elman and GRU (H),
[h, c] for LSTM (2H). Everything downstream treats it as opaque.

Every cell splits into an input projection (`project`, one matmul over all steps)
and a recurrence (`recur`, one step from a projected input). `forward` runs a whole
(B, T, I) sequence; `step` runs one (B, I) input. The ONNX export mirrors this math.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CELL_KINDS = ("elman", "gru", "lstm")


class Cell(nn.Module):
    """Base class: a recurrent cell over float input vectors with an opaque state vector."""

    kind: str = ""
    gates: int = 1  # width of the projected input, in units of hidden_size
    state_factor: int = 1  # state_size = state_factor * hidden_size

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size

    @property
    def state_size(self) -> int:
        """Length of this cell's state vector."""
        return self.state_factor * self.hidden_size

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.RNN/GRU/LSTM do."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def project(self, x: Tensor) -> Tensor:
        """Input projection for any leading shape: (..., I) -> (..., gates*H)."""
        raise NotImplementedError

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step from a projected input: (B, G), (B, S) -> h (B, H), state (B, S)."""
        raise NotImplementedError

    def output(self, state: Tensor) -> Tensor:
        """The hidden output h held in a state vector: (B, S) -> (B, H)."""
        return state[..., : self.hidden_size]

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step: x (B, I), state (B, S) -> h (B, H), state (B, S)."""
        return self.recur(self.project(x), state)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """A sequence: x (B, T, I), state (B, S) -> hs (B, T, H), final state (B, S)."""
        xp = self.project(x)  # (B, T, G): one matmul for all steps
        hs = []
        for t in range(xp.shape[1]):
            h, state = self.recur(xp[:, t], state)
            hs.append(h)
        return torch.stack(hs, dim=1), state


class ElmanScan(torch.autograd.Function):
    """The Elman recurrence h_t = tanh(xp_t + h_{t-1} W_h) with a hand-written backward.

    Forward keeps only the hidden states; backward walks time in reverse once and
    then forms dW_h in a single matmul, which is what makes this as fast as nn.RNN.
    """

    @staticmethod
    def forward(ctx, xp: Tensor, h0: Tensor, w_h: Tensor) -> Tensor:  # xp (T, B, H), h0 (B, H)
        hs = torch.empty_like(xp)  # (T, B, H)
        h = h0
        for t in range(xp.shape[0]):
            h = torch.tanh(torch.addmm(xp[t], h, w_h))  # (B, H)
            hs[t] = h
        ctx.save_for_backward(hs, h0, w_h)
        return hs

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # g (T, B, H)
        hs, h0, w_h = ctx.saved_tensors
        da = torch.empty_like(hs)  # (T, B, H): gradient at the pre-activation
        carry = torch.zeros_like(h0)  # (B, H): gradient flowing into h_{t-1}
        w_ht = w_h.t()
        for t in range(hs.shape[0] - 1, -1, -1):
            a = (g[t] + carry) * (1.0 - hs[t] * hs[t])
            da[t] = a
            carry = a @ w_ht
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0)  # (T, B, H)
        hidden = hs.shape[-1]
        dw_h = h_prev.reshape(-1, hidden).t() @ da.reshape(-1, hidden)  # (H, H)
        return da, carry, dw_h


class ElmanCell(Cell):
    """The simple recurrent network: h' = tanh(x W_x + b + h W_h)."""

    kind = "elman"
    gates = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.w_x = nn.Parameter(torch.empty(input_size, hidden_size))
        self.w_h = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.b = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def project(self, x: Tensor) -> Tensor:
        return x @ self.w_x + self.b

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(xp + state @ self.w_h)  # (B, H)
        return h, h

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        xp = self.project(x).transpose(0, 1).contiguous()  # (T, B, H)
        hs = ElmanScan.apply(xp, state, self.w_h).transpose(0, 1)  # (B, T, H)
        return hs, hs[:, -1]


class GRUCell(Cell):
    """Gated recurrent unit (Cho et al. 2014), PyTorch's formulation with r applied after W_hn."""

    kind = "gru"
    gates = 3

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.w_x = nn.Parameter(torch.empty(input_size, 3 * hidden_size))
        self.w_h = nn.Parameter(torch.empty(hidden_size, 3 * hidden_size))
        self.b_x = nn.Parameter(torch.empty(3 * hidden_size))
        self.b_h = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def project(self, x: Tensor) -> Tensor:
        return x @ self.w_x + self.b_x

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        hp = state @ self.w_h + self.b_h  # (B, 3H)
        r = torch.sigmoid(xp[:, :H] + hp[:, :H])
        z = torch.sigmoid(xp[:, H : 2 * H] + hp[:, H : 2 * H])
        n = torch.tanh(xp[:, 2 * H :] + r * hp[:, 2 * H :])
        h = (1.0 - z) * n + z * state  # (B, H)
        return h, h


class LSTMCell(Cell):
    """Long short-term memory (Hochreiter & Schmidhuber 1997); the state is [h, c]."""

    kind = "lstm"
    gates = 4
    state_factor = 2

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.w_x = nn.Parameter(torch.empty(input_size, 4 * hidden_size))
        self.w_h = nn.Parameter(torch.empty(hidden_size, 4 * hidden_size))
        self.b = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def project(self, x: Tensor) -> Tensor:
        return x @ self.w_x + self.b

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        h, c = state[:, :H], state[:, H:]
        gates = xp + h @ self.w_h  # (B, 4H)
        i = torch.sigmoid(gates[:, :H])
        f = torch.sigmoid(gates[:, H : 2 * H])
        g = torch.tanh(gates[:, 2 * H : 3 * H])
        o = torch.sigmoid(gates[:, 3 * H :])
        c = f * c + i * g  # (B, H)
        h = o * torch.tanh(c)  # (B, H)
        return h, torch.cat([h, c], dim=1)


def make_cell(kind: str, input_size: int, hidden_size: int) -> Cell:
    """Build a cell by name ('elman', 'gru' or 'lstm')."""
    cells = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}
    if kind not in cells:
        raise ValueError(f"unknown cell {kind!r}: expected one of {', '.join(CELL_KINDS)}")
    return cells[kind](input_size, hidden_size)
