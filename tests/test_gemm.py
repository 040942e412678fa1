"""The oneDNN-routed products of the cells against torch's own matmul, views and packed weights included."""
from __future__ import annotations

import pytest
import torch
from rnnserve.trainer.gemm import linear, linear_add, linear_sigmoid, pack, project


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes the torch fallback
def test_products_equal_matmul(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(7, 12, dtype=dtype), torch.randn(12, 20, dtype=dtype)  # w (K, N)
    b, other = torch.randn(20, dtype=dtype), torch.randn(7, 20, dtype=dtype)
    ref = x @ w
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    for w_t in (w.t(), w.t().contiguous(), pack(w.t(), 7)):  # a view, dense, packed
        torch.testing.assert_close(linear(x, w_t), ref, **tol)
        torch.testing.assert_close(linear(x, w_t, b), ref + b, **tol)
        torch.testing.assert_close(linear_add(x, w_t, other), ref + other, **tol)
        torch.testing.assert_close(linear_sigmoid(x, w_t, b), torch.sigmoid(ref + b), **tol)
    # Transposed inputs (the dW GEMMs) and a column slice of a weight (copied before oneDNN sees it).
    torch.testing.assert_close(linear(x.t(), ref.t()), x.t() @ ref, **tol)
    torch.testing.assert_close(linear(x, w[:, 5:].t()), x @ w[:, 5:], **tol)


def test_packed_weight_takes_any_batch() -> None:
    torch.manual_seed(1)
    w_t = torch.randn(16, 8)
    packed = pack(w_t, 32)
    for rows in (1, 5, 32, 40):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(linear(x, packed), x @ w_t.t(), atol=1e-5, rtol=1e-5)


def test_project_gradients_match_autograd() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(project, (x, w, b))
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    out = project(x32, w32, b32)  # the oneDNN path, against plain autograd
    ref_in = [t.detach().clone().requires_grad_() for t in (x32, w32, b32)]
    ref = ref_in[0] @ ref_in[1] + ref_in[2]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x32, w32, b32), g), torch.autograd.grad(ref, ref_in, g)):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)
