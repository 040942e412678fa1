"""The native LSTM step kernels: same values and gradients as the torch ops, the build cache, the fallback."""
from __future__ import annotations

import ctypes
import logging
import shutil
from pathlib import Path

import pytest
import torch
from rnnserve.trainer import fused
from rnnserve.trainer.cells import LSTMScan, make_cell

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build trainer/fused.c")


@pytest.fixture
def torch_ops():
    """Run the body on the torch-op path, restoring the native one after."""
    fused.set_enabled(False)
    yield
    fused.set_enabled(True)


def _scan(native: bool, steps: int, grad_h: str) -> list[torch.Tensor]:
    """LSTMScan's outputs and every input gradient on one path; grad_h: 'dense', 'strided' or 'none'."""
    fused.set_enabled(native)
    try:
        torch.manual_seed(3)
        T, B, H, I = steps, 5, 24, 7
        x = torch.randn(T, B, I, requires_grad=True)
        h0, c0 = torch.randn(B, H, requires_grad=True), torch.randn(B, H, requires_grad=True)
        w_x = (torch.randn(I, 4 * H) * 0.3).requires_grad_()
        w_h = (torch.randn(H, 4 * H) * 0.3).requires_grad_()
        b = torch.randn(4 * H).requires_grad_()
        hs, c = LSTMScan.apply(x, h0, c0, w_x, w_h, b)
        loss = (c * torch.randn_like(c)).sum()
        if grad_h == "dense":
            loss = loss + (hs * torch.randn_like(hs)).sum()
        elif grad_h == "strided":  # the gradient arrives batch-major, as after the model's transpose
            loss = loss + (hs.transpose(0, 1) * torch.randn(B, T, H)).sum()
        loss.backward()
        return [hs, c] + [t.grad for t in (x, h0, c0, w_x, w_h, b)]
    finally:
        fused.set_enabled(True)


def test_native_kernels_are_in_use_for_float32_cpu() -> None:
    assert fused.available(torch.zeros(1))
    assert not fused.available(torch.zeros(1, dtype=torch.float64))  # the gradchecks take the torch ops


@pytest.mark.parametrize("grad_h", ["dense", "strided", "none"])
@pytest.mark.parametrize("steps", [1, 37])
def test_native_walk_equals_torch_ops(steps: int, grad_h: str) -> None:
    native, ops = _scan(True, steps, grad_h), _scan(False, steps, grad_h)
    names = ["h", "c_T", "dx", "dh0", "dc0", "dW_x", "dW_h", "db"]
    for name, a, b in zip(names, native, ops):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_torch_op_path_trains_the_same_model(torch_ops) -> None:
    """The fallback keeps every cell usable: one LSTM forward/backward with the native path off."""
    cell = make_cell("lstm", 4, 6)
    hs, s = cell(torch.randn(2, 9, 4), torch.randn(2, cell.state_size))
    (hs.sum() + s.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


def test_build_is_cached_per_source_and_loadable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = fused.build()
    assert first.parent == tmp_path / "rnnserve" and first.name.startswith("fused-")
    mtime = first.stat().st_mtime_ns
    assert fused.build() == first and first.stat().st_mtime_ns == mtime  # no rebuild
    lib = ctypes.CDLL(str(first))
    assert hasattr(lib, "lstm_step_forward") and hasattr(lib, "lstm_step_backward")
    assert [p.name for p in (tmp_path / "rnnserve").iterdir()] == [first.name]  # no temporary left behind


def test_missing_compiler_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-cc'"):
        fused.build(cc="no-such-cc")


def test_compiler_failure_is_reported_and_falls_back(tmp_path: Path, monkeypatch, caplog) -> None:
    """A compiler that fails: its message reaches the log, nothing is cached, the torch ops take over."""
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'fused.c:1: error: simulated' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(bad))
    with pytest.raises(RuntimeError, match="simulated"):
        fused.build()
    monkeypatch.setitem(fused._state, "tried", False)
    monkeypatch.setitem(fused._state, "lib", None)
    with caplog.at_level(logging.WARNING, logger="rnnserve.trainer.fused"):
        assert not fused.available(torch.zeros(1))
    assert "using torch ops" in caplog.text and "simulated" in caplog.text
    assert list((tmp_path / "cache" / "rnnserve").iterdir()) == []


def test_a_damaged_cached_build_is_rebuilt(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = fused.build()
    path.write_bytes(b"not a shared library")
    monkeypatch.setitem(fused._state, "tried", False)
    monkeypatch.setitem(fused._state, "lib", None)
    with caplog.at_level(logging.WARNING, logger="rnnserve.trainer.fused"):
        assert fused.available(torch.zeros(1))
    assert "rebuilding" in caplog.text and path.read_bytes() != b"not a shared library"
    assert _scan(True, 5, "dense")[2].isfinite().all()  # and it computes
