"""Hand-written cells: gradients, the fast recurrences against the plain loop, state modes, stacking."""
from __future__ import annotations

import pytest
import torch
from rnnserve.trainer.cells import Cell, GRUScan, LSTMScan, make_cell
from rnnserve.trainer.model import ModelConfig, RNNModel

KINDS = ("elman", "gru", "lstm")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind: str) -> None:
    torch.manual_seed(0)
    cell = make_cell(kind, 3, 4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, cell.state_size, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in cell.named_parameters()]
    # Parameters as explicit inputs so their gradients (dW_h in one matmul) are checked too.
    ps = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())

    def run(x, s, *ps):
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, s))

    assert torch.autograd.gradcheck(run, (x, s, *ps))


@pytest.mark.parametrize("steps", [11, 37])  # 37: more than one backward block, and a partial one
@pytest.mark.parametrize("kind", KINDS)
def test_custom_function_equals_plain_loop(kind: str, steps: int) -> None:
    torch.manual_seed(1)
    cell = make_cell(kind, 8, 16)
    x = torch.randn(3, steps, 8, requires_grad=True)
    s = torch.randn(3, cell.state_size, requires_grad=True)
    fast_hs, fast_s = cell(x, s)
    slow_hs, slow_s = Cell.forward(cell, x, s)  # the plain loop over recur()
    torch.testing.assert_close(fast_hs, slow_hs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast_s, slow_s, atol=1e-6, rtol=1e-5)
    w_hs, w_s = torch.randn_like(fast_hs), torch.randn_like(fast_s)
    wrt = [x, s, *cell.parameters()]
    g_fast = torch.autograd.grad((fast_hs * w_hs).sum() + (fast_s * w_s).sum(), wrt)
    g_slow = torch.autograd.grad((slow_hs * w_hs).sum() + (slow_s * w_s).sum(), wrt)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_sequence(kind: str) -> None:
    torch.manual_seed(2)
    model = RNNModel(ModelConfig(vocab_size=7, cell=kind, hidden_size=12, layers=2, embed_size=5)).eval()
    tokens = torch.randint(0, 7, (3, 9))
    logits, state = model(tokens)
    s = model.initial_state(3)
    for t in range(9):
        step_logits, s = model.step(tokens[:, t], s)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, state, atol=1e-5, rtol=1e-5)


def test_state_sizes_and_float_inputs() -> None:
    assert make_cell("elman", 3, 8).state_size == 8
    assert make_cell("gru", 3, 8).state_size == 8
    assert make_cell("lstm", 3, 8).state_size == 16
    cell = make_cell("gru", 3, 8)  # float vectors in, no embedding needed
    hs, s = cell(torch.randn(2, 4, 3), torch.zeros(2, 8))
    assert hs.shape == (2, 4, 8) and s.shape == (2, 8)
    torch.testing.assert_close(hs[:, -1], s)
    with pytest.raises(ValueError, match="unknown cell 'tree'"):
        make_cell("tree", 3, 8)


def test_lstm_final_cell_gradient_flows() -> None:
    torch.manual_seed(3)
    xp = torch.randn(4, 2, 12, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    w_x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LSTMScan.apply, (x, h0, c0, w_x, w, xp[0, 0].detach().requires_grad_()))
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GRUScan.apply, (xp[..., :9].detach().requires_grad_(), h0,
                                                    w[:, :9].detach().requires_grad_(), b))


@pytest.mark.parametrize("kind", KINDS)
def test_initial_state_modes(kind: str) -> None:
    torch.manual_seed(4)
    zeros = RNNModel(ModelConfig(vocab_size=5, cell=kind, hidden_size=6, embed_size=3))
    assert torch.equal(zeros.initial_state(2), torch.zeros(2, zeros.state_size))
    assert not any(n == "h0" for n, _ in zeros.named_parameters())  # a buffer, not trained

    learned = RNNModel(ModelConfig(vocab_size=5, cell=kind, hidden_size=6, embed_size=3, init_state="learned"))
    assert "h0" in dict(learned.named_parameters())
    tokens = torch.randint(0, 5, (2, 4))
    logits, _ = learned(tokens)
    logits.sum().backward()
    assert learned.h0.grad is not None and learned.h0.grad.abs().sum() > 0  # it trains

    given = torch.randn(zeros.state_size)
    s = zeros.initial_state(3, given)
    assert s.shape == (3, zeros.state_size) and torch.equal(s[2], given)
    out_given, _ = zeros(tokens, zeros.initial_state(2, given))
    out_zero, _ = zeros(tokens)
    assert not torch.allclose(out_given, out_zero)  # the given state is used
    with pytest.raises(ValueError, match=f"state has length {zeros.state_size + 1}, expected {zeros.state_size}"):
        zeros.initial_state(2, torch.zeros(zeros.state_size + 1))
    with pytest.raises(ValueError, match="unknown init_state"):
        ModelConfig(vocab_size=5, init_state="random")


def test_stacked_state_layout() -> None:
    torch.manual_seed(5)
    model = RNNModel(ModelConfig(vocab_size=6, cell="lstm", hidden_size=4, layers=3, embed_size=2))
    assert model.state_sizes == [8, 8, 8] and model.state_size == 24
    s = torch.randn(2, 24)
    blocks = model.split_state(s)
    assert [b.shape[-1] for b in blocks] == [8, 8, 8] and torch.equal(torch.cat(blocks, -1), s)
    tokens = torch.randint(0, 6, (2, 5))
    _, state = model(tokens, s)
    # Layer by layer by hand: bottom first, each layer's [h, c] block in order.
    x = model.embed(tokens)
    for cell, block, out in zip(model.layer_cells, blocks, model.split_state(state)):
        x, s_l = cell(x, block)
        torch.testing.assert_close(out, s_l)
        torch.testing.assert_close(out[:, :4], x[:, -1])  # h first, then c


@pytest.mark.parametrize("kind", KINDS)
def test_weight_drop_masks_w_h_in_training_only(kind: str) -> None:
    torch.manual_seed(6)
    model = RNNModel(ModelConfig(vocab_size=6, cell=kind, hidden_size=8, layers=2, embed_size=3, weight_drop=0.5))
    cell = model.layer_cells[0]
    assert all(c.weight_drop == 0.5 for c in model.layer_cells)
    x, s = torch.randn(2, 7, 3), torch.randn(2, cell.state_size)
    cell.eval()
    assert cell.dropped_w_h() is cell.w_h  # evaluation and export see the whole W_h
    plain, _ = cell(x, s)
    cell.train()
    torch.manual_seed(7)
    dropped, _ = cell(x, s)
    torch.manual_seed(7)
    mask_w = cell.dropped_w_h().detach()  # the same draw: the W_h that forward used
    frac = (mask_w == 0).float().mean().item()
    assert 0.35 < frac < 0.65
    torch.testing.assert_close(mask_w[mask_w != 0], 2.0 * cell.w_h.detach()[mask_w != 0])  # kept ones rescaled
    cell.eval()
    with torch.no_grad():
        w_h = cell.w_h.clone()
        cell.w_h.copy_(mask_w)
        expected, _ = cell(x, s)
        cell.w_h.copy_(w_h)
    torch.testing.assert_close(dropped, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(dropped, plain)
    dropped.sum().backward()
    assert torch.all(cell.w_h.grad[mask_w == 0] == 0) and cell.w_h.grad[mask_w != 0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"weight_drop must be in \[0, 1\), got 1.0"):
        ModelConfig(vocab_size=5, weight_drop=1.0)
