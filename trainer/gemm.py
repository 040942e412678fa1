"""The cells' matrix products, routed through oneDNN for float32 on the CPU.

MKL (torch's default BLAS here) runs the recurrences' shapes at under half oneDNN's speed on some
CPUs (AMD EPYC on this machine: a 32x256 @ 256x1024 step GEMM in 128 vs 57 us, dW_h for 4096 rows in
10.5 vs 5.6 ms). oneDNN is also the engine torch.nn.LSTM uses on the CPU. Every function here falls
back to torch's matmul for other dtypes (the float64 gradient checks) and devices (CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACK = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN else None


def _onednn(t: Tensor) -> bool:
    """Whether products with t go through oneDNN: float32 on the CPU, in a torch built with it."""
    return _ONEDNN and t.dtype == torch.float32 and t.device.type == "cpu"


def _dense(w: Tensor) -> Tensor:
    """w as oneDNN takes it well: packed, contiguous or a transposed contiguous tensor.

    Any other view (a column slice, say) goes through oneDNN's strided path, which ran a 4096x256x256
    GEMM in 5 s instead of 2 ms here: copy it first.
    """
    if w.is_mkldnn or w.is_contiguous() or w.t().is_contiguous():
        return w
    return w.contiguous()


def linear(x: Tensor, w_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ w_t.T (+ bias) for (B, K), (N, K) -> (B, N); either operand may be a view, w_t packed by `pack`."""
    if _onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, _dense(w_t), bias, "none", [], "")
    return x @ w_t.t() if bias is None else torch.addmm(bias, x, w_t.t())


def linear_add(x: Tensor, w_t: Tensor, other: Tensor) -> Tensor:
    """x @ w_t.T + other in one oneDNN call (the add fused into the GEMM) where `linear` uses oneDNN."""
    if _onednn(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, _dense(w_t), None, "add")
    return torch.addmm(other, x, w_t.t())


def linear_sigmoid(x: Tensor, w_t: Tensor, bias: Tensor) -> Tensor:
    """sigmoid(x @ w_t.T + bias), the sigmoid fused into the GEMM where `linear` uses oneDNN."""
    if _onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, _dense(w_t), bias, "sigmoid", [], "")
    return torch.addmm(bias, x, w_t.t()).sigmoid_()


def pack(w_t: Tensor, batch: int) -> Tensor:
    """A contiguous (N, K) weight in oneDNN's own blocked layout for `linear`, reused by every step.

    Saves the per-call reorder (~20% of a step's GEMM here); a no-op where `linear` does not use oneDNN.
    """
    if _onednn(w_t) and _PACK is not None:
        return _PACK(w_t.contiguous(), batch)
    return w_t


class Project(torch.autograd.Function):
    """The input projection x @ W + b with its backward, every product through `linear`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # x (N, I), w (I, G), b (G,)
        ctx.save_for_backward(x, w)
        return linear(x, w.t(), b)  # (N, G)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # g (N, G)
        x, w = ctx.saved_tensors
        dx = linear(g, w) if ctx.needs_input_grad[0] else None  # (N, I)
        dw = linear(x.t(), g.t()) if ctx.needs_input_grad[1] else None  # (I, G)
        db = g.sum(0) if ctx.needs_input_grad[2] else None  # (G,)
        return dx, dw, db


def project(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x @ w + b for any leading shape: (..., I) -> (..., G)."""
    return Project.apply(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[-1])
