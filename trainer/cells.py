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
(B, T, I) sequence through a custom autograd function (the LSTM's folds the projection
into its per-step GEMM); `step` runs one (B, I) input. The ONNX export mirrors this math.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import fused
from .gemm import linear, linear_add, linear_sigmoid, pack, project

CELL_KINDS = ("elman", "gru", "lstm")


def _dw_h(h0: Tensor, hs: Tensor, da: Tensor) -> Tensor:
    """dW_h = sum_t h_{t-1}^T da_t for h0 (B, H), hs and da (T, B, G): step 0, then one GEMM for the rest."""
    T, B, H = hs.shape
    dw = h0.t() @ da[0]  # (H, G)
    if T > 1:
        dw += linear(hs[:-1].reshape(-1, H).t(), da[1:].reshape((T - 1) * B, -1).t())
    return dw


class Cell(nn.Module):
    """Base class: a recurrent cell over float input vectors with an opaque state vector."""

    kind: str = ""
    gates: int = 1  # width of the projected input, in units of hidden_size
    state_factor: int = 1  # state_size = state_factor * hidden_size

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_drop = 0.0  # DropConnect on W_h in training (set by the model): one mask per forward

    def dropped_w_h(self) -> Tensor:
        """W_h as a training forward uses it: entries dropped with p = weight_drop (rescaled), else W_h itself.

        The recurrent regulariser of AWD-LSTM (Merity et al. 2017): one mask for every step and sequence of
        the chunk, so the recurrence itself stays intact, and no cost per step.
        """
        if self.weight_drop > 0.0 and self.training:
            return nn.functional.dropout(self.w_h, self.weight_drop, training=True)
        return self.w_h

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
        h = h0.contiguous()
        w_p = pack(w_h.t(), h.shape[0])  # (H, H) as (out, in)
        for t in range(xp.shape[0]):
            h = torch.tanh(linear_add(h, w_p, xp[t]), out=hs[t])  # (B, H)
        ctx.save_for_backward(hs, h0, w_h)
        return hs

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # g (T, B, H)
        hs, h0, w_h = ctx.saved_tensors
        da = torch.empty_like(hs)  # (T, B, H): gradient at the pre-activation
        carry = torch.zeros_like(h0)  # (B, H): gradient flowing into h_{t-1}
        w_p = pack(w_h, h0.shape[0])
        dtanh = 1.0 - hs * hs  # (T, B, H), for all steps at once
        for t in range(hs.shape[0] - 1, -1, -1):
            a = torch.mul(g[t] + carry, dtanh[t], out=da[t])
            carry = linear(a, w_p)  # (B, H)
        return da, carry, _dw_h(h0, hs, da)


class GRUScan(torch.autograd.Function):
    """The GRU recurrence over projected inputs with a hand-written backward.

    Forward saves h, r, z, n per step. Backward first forms every step's local derivative
    factors in a few whole-sequence ops (h W_hn + b_hn again in one matmul), so the reverse
    walk over time is four small ops per step; dW_h and db_h are one matmul / sum at the end.
    """

    @staticmethod
    def forward(ctx, xp: Tensor, h0: Tensor, w_h: Tensor, b_h: Tensor) -> Tensor:  # xp (T, B, 3H)
        T, H = xp.shape[0], h0.shape[-1]
        hs = xp.new_empty(T, *h0.shape)  # (T, B, H)
        acts = torch.empty_like(xp)  # (T, B, 3H): r, z, n
        h = h0.contiguous()
        w_p = pack(w_h.t(), h.shape[0])  # (3H, H)
        for t in range(T):
            hp = linear(h, w_p, b_h)  # (B, 3H)
            a = acts[t]
            rz = torch.add(xp[t, :, : 2 * H], hp[:, : 2 * H], out=a[:, : 2 * H]).sigmoid_()  # (B, 2H)
            n = torch.addcmul(xp[t, :, 2 * H :], rz[:, :H], hp[:, 2 * H :], out=a[:, 2 * H :]).tanh_()
            h = torch.addcmul(n, rz[:, H:], h - n, out=hs[t])  # (1 - z) n + z h
        ctx.save_for_backward(hs, acts, h0, w_h, b_h)
        return hs

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # g (T, B, H)
        hs, acts, h0, w_h, b_h = ctx.saved_tensors
        T, B, H = hs.shape
        h_prev = torch.cat([h0.unsqueeze(0).expand(1, B, H), hs[:-1]], dim=0)  # (T, B, H)
        hn = linear(h_prev.view(-1, H), w_h[:, 2 * H :].t(), b_h[2 * H :]).view(T, B, H)
        r, z, n = acts.split(H, dim=-1)  # (T, B, H) each
        # d(pre-activation)/dh_t for each gate, per step: the backward carry only scales them.
        a_n = (1.0 - z) * (1.0 - n * n)  # (T, B, H)
        coef = torch.cat([a_n * hn * r * (1.0 - r), (h_prev - n) * z * (1.0 - z), a_n * r], dim=-1)
        dhp = torch.empty_like(acts)  # (T, B, 3H): gradient at h W_h + b_h
        dh_all = torch.empty_like(hs)  # (T, B, H): gradient at each h_t
        carry = torch.zeros(B, H, dtype=hs.dtype, device=hs.device)
        w_p = pack(w_h, B)  # (H, 3H)
        for t in range(T - 1, -1, -1):
            dh = torch.add(g[t], carry, out=dh_all[t])
            d = torch.mul(coef[t].view(B, 3, H), dh.unsqueeze(1), out=dhp[t].view(B, 3, H))
            carry = linear(d.view(B, 3 * H), w_p).addcmul_(dh, z[t])  # (B, H)
        dxp = dhp.clone()
        dxp[..., 2 * H :] = dh_all * a_n  # the n gate's input side is not scaled by r
        flat = dhp.view(-1, 3 * H)
        return dxp, carry, linear(h_prev.view(-1, H).t(), flat.t()), flat.sum(0)  # h_prev is already built


class LSTMScan(torch.autograd.Function):
    """A whole LSTM layer over time-major inputs, with a hand-written backward.

    Each step is one GEMM of [h_{t-1}, x_t] against [W_h; W_x] with the bias and a sigmoid over all
    four gates fused into it (oneDNN post-ops on the CPU); the g gate's columns are pre-scaled by 2
    so that tanh(z) = 2 sigmoid(2z) - 1 needs no op of its own: c = f c - i + 2 i s(2 z_g). The
    element-wise rest of a step is one native loop (`trainer.fused`) for float32 on the CPU, else a
    few torch ops (`_lstm_forward`); the reverse walk likewise. dW_h and dW_x are one GEMM at the
    end, dx another.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_x: Tensor, w_h: Tensor, b: Tensor
                ) -> tuple[Tensor, Tensor]:
        (T, B, I), H = x.shape, h0.shape[-1]  # x (T, B, I), h0 c0 (B, H)
        scale = _g_scale(H, b)  # (4H,)
        w_p = pack((torch.cat([w_h, w_x]) * scale).t(), B)  # (4H, H + I)
        bias = b * scale  # (4H,)
        hx = x.new_empty(T + 1, B, H + I)  # (T + 1, B, H + I): [h_{t-1}, x_t] is step t's input
        hx[0, :, :H] = h0
        hx[:T, :, H:] = x
        cs = x.new_empty(T + 1, B, H)  # (T + 1, B, H): c_0 .. c_T
        tcs = x.new_empty(T, B, H)  # (T, B, H): tanh(c_t)
        cs[0] = c0
        walk = fused.lstm_forward if fused.available(x) else _lstm_forward
        acts = walk(hx, cs, tcs, w_p, bias)  # per step (B, 4H)
        ctx.save_for_backward(hx, cs, tcs, w_x, w_h, *acts)
        return hx[1:, :, :H], cs[T].clone()

    @staticmethod
    def backward(ctx, g_h: Tensor | None, g_c: Tensor | None):  # g_h (T, B, H), g_c (B, H)
        hx, cs, tcs, w_x, w_h, *acts = ctx.saved_tensors
        T, (B, H), I = len(acts), cs.shape[1:], w_x.shape[0]
        da = cs.new_empty(T, B, 4 * H)  # (T, B, 4H): gradient at the gate pre-activations
        carry_h = cs.new_zeros(B, H)
        carry_c = cs.new_zeros(B, H) if g_c is None else g_c.clone(memory_format=torch.contiguous_format)
        w_p = pack(w_h, B)  # (H, 4H)
        walk = fused.lstm_backward if fused.available(cs) else _lstm_backward
        carry_h, carry_c = walk(acts, cs, tcs, g_h, carry_h, carry_c, w_p, da)  # fills da
        flat = da.view(T * B, 4 * H)
        dw = linear(hx[:T].reshape(T * B, H + I).t(), flat.t())  # (H + I, 4H): [dW_h; dW_x]
        dx = linear(flat, w_x).view(T, B, I) if ctx.needs_input_grad[0] else None
        return dx, carry_h, carry_c, dw[H:], dw[:H], flat.sum(0)


def _g_scale(hidden: int, like: Tensor) -> Tensor:
    """(4H,) ones with 2 on the g gate: tanh(z) = 2 sigmoid(2z) - 1 lets one sigmoid serve all gates."""
    scale = like.new_ones(4 * hidden)
    scale[2 * hidden : 3 * hidden] = 2.0
    return scale


def _lstm_forward(hx: Tensor, cs: Tensor, tcs: Tensor, w_p: Tensor, bias: Tensor) -> list[Tensor]:
    """LSTMScan's forward walk in torch ops (the contract of `fused.lstm_forward`, which see)."""
    H = tcs.shape[-1]
    inputs, hs, c_t, tc_t = hx.unbind(0), hx[1:, :, :H].unbind(0), cs.unbind(0), tcs.unbind(0)
    acts = []  # per step (B, 4H): sigmoid(i), sigmoid(f), sigmoid(2 z_g), sigmoid(o)
    for t in range(len(tc_t)):
        a = linear_sigmoid(inputs[t], w_p, bias)  # (B, 4H)
        i, f, s_g, o = a.split(H, dim=1)  # (B, H) each
        c = torch.addcmul((f * c_t[t]).sub_(i), i, s_g, value=2.0, out=c_t[t + 1])  # f c + i tanh(g)
        torch.mul(o, torch.tanh(c, out=tc_t[t]), out=hs[t])  # h_t (B, H)
        acts.append(a)
    return acts


def _lstm_backward(acts: list[Tensor], cs: Tensor, tcs: Tensor, g_h: Tensor | None, carry_h: Tensor,
                   carry_c: Tensor, w_p: Tensor, da: Tensor) -> tuple[Tensor, Tensor]:
    """LSTMScan's reverse walk in torch ops (the contract of `fused.lstm_backward`, which see).

    The local derivative factors are formed a block of steps at a time (whole-block ops on
    cache-sized tensors), so the walk itself is five small ops and one GEMM a step.
    """
    T, (B, H) = len(acts), cs.shape[1:]
    for end in range(T, 0, -_BLOCK):
        start = max(0, end - _BLOCK)
        k, p, f = _lstm_factors(torch.stack(acts[start:end]), cs[start:end], tcs[start:end])
        for j in range(end - 1 - start, -1, -1):
            t = start + j
            dh = carry_h if g_h is None else g_h[t] + carry_h  # (B, H)
            dc = torch.addcmul(carry_c, dh, p[j])  # (B, H)
            torch.mul(k[j], torch.stack((dc, dc, dc, dh), dim=1), out=da[t].view(B, 4, H))
            carry_c = dc * f[j]
            carry_h = linear(da[t], w_p)  # (B, H)
    return carry_h, carry_c


_BLOCK = 16  # steps whose backward factors are formed together (16 x B x 4H floats stay in cache)


def _lstm_factors(a: Tensor, c_prev: Tensor, tc: Tensor) -> tuple[tuple[Tensor, ...], ...]:
    """Per-step factors of the LSTM backward for a block of steps.

    a (N, B, 4H) = [s(i), s(f), s(2 z_g), s(o)], c_prev and tc = tanh(c) (N, B, H) -> per step k (B, 4, H),
    p (B, H) and s(f) (B, H), with dc = carry_c + dh * p, the gradient at the pre-activations
    k * [dc, dc, dc, dh] and the carry into c_{t-1} dc * s(f).
    """
    i, f, s_g, o = a.split(a.shape[-1] // 4, dim=-1)  # (N, B, H) each
    g = s_g * 2.0 - 1.0  # tanh(z_g)
    sd = torch.addcmul(a, a, a, value=-1.0).view(*i.shape[:-1], 4, -1)  # s (1 - s) of every gate
    k = torch.empty_like(sd)  # (N, B, 4, H)
    torch.mul(g, sd[..., 0, :], out=k[..., 0, :])  # i: tanh(g) s'(i)
    torch.mul(c_prev, sd[..., 1, :], out=k[..., 1, :])  # f: c_{t-1} s'(f)
    torch.addcmul(i, i, g * g, value=-1.0, out=k[..., 2, :])  # g: s(i) (1 - tanh(g)^2)
    torch.mul(tc, sd[..., 3, :], out=k[..., 3, :])  # o: tanh(c) s'(o)
    p = torch.addcmul(o, o, tc * tc, value=-1.0)  # s(o) (1 - tanh(c)^2)
    return k.unbind(0), p.unbind(0), f.unbind(0)


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
        return project(x, self.w_x, self.b)

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(xp + state @ self.w_h)  # (B, H)
        return h, h

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        xp = self.project(x.transpose(0, 1))  # (T, B, H): time-major, one GEMM
        hs = ElmanScan.apply(xp, state, self.dropped_w_h()).transpose(0, 1)  # (B, T, H)
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
        return project(x, self.w_x, self.b_x)

    def recur(self, xp: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        hp = state @ self.w_h + self.b_h  # (B, 3H)
        r = torch.sigmoid(xp[:, :H] + hp[:, :H])
        z = torch.sigmoid(xp[:, H : 2 * H] + hp[:, H : 2 * H])
        n = torch.tanh(xp[:, 2 * H :] + r * hp[:, 2 * H :])
        h = (1.0 - z) * n + z * state  # (B, H)
        return h, h

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        xp = self.project(x.transpose(0, 1))  # (T, B, 3H): time-major, one GEMM
        hs = GRUScan.apply(xp, state, self.dropped_w_h(), self.b_h).transpose(0, 1)  # (B, T, H)
        return hs, hs[:, -1]


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
        return project(x, self.w_x, self.b)

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

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        H = self.hidden_size
        w_h = self.dropped_w_h()
        hs, c = LSTMScan.apply(x.transpose(0, 1), state[:, :H], state[:, H:], self.w_x, w_h, self.b)
        hs = hs.transpose(0, 1)  # (B, T, H)
        return hs, torch.cat([hs[:, -1], c], dim=1)


def make_cell(kind: str, input_size: int, hidden_size: int) -> Cell:
    """Build a cell by name ('elman', 'gru' or 'lstm')."""
    cells = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}
    if kind not in cells:
        raise ValueError(f"unknown cell {kind!r}: expected one of {', '.join(CELL_KINDS)}")
    return cells[kind](input_size, hidden_size)
