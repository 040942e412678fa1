"""Native (C) per-step kernels for the LSTM recurrence, built on first use, with torch as the fallback.

Between two step GEMMs the LSTM does a handful of element-wise ops on (B, H) tensors. As torch ops
they cost ~25 us a step here, almost all dispatch overhead and torch's slow tanh (13 us for 8,192
floats), and run on one core; the same work fused into one C loop takes ~4 us. That gap is what kept
the hand LSTM below nn.LSTM, whose oneDNN kernel fuses it the same way.

`trainer/fused.c` is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache
(`$XDG_CACHE_HOME/rnnserve`, else `~/.cache/rnnserve`), keyed by source, flags and CPU, and called
through ctypes on raw pointers. Without a compiler, a warning is logged once and the cells use
their torch ops: the same math, slower. `set_enabled(False)` forces that path (tests, benches).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .gemm import linear, linear_sigmoid

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared"]
_state: dict[str, object] = {"enabled": True, "lib": None, "tried": False}


def set_enabled(flag: bool) -> None:
    """Use the native kernels (True, the default, where they build) or always the torch ops (False)."""
    _state["enabled"] = flag


def _cache_dir() -> Path:
    """Where built libraries live: $XDG_CACHE_HOME/rnnserve or ~/.cache/rnnserve."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rnnserve"


def _cpu_id() -> str:
    """The CPU's feature flags: -march=native code is only valid where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(cc: str | None = None) -> Path:
    """Compile fused.c (if not already cached) and return the shared library's path; raises on failure."""
    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fused-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[:2000]}")
        os.replace(out, target)  # atomic: a concurrent build of the same key writes the same bytes
    log.info("built %s", target)
    return target


def _load() -> ctypes.CDLL | None:
    """The native library, built and loaded once per process; None (logged once) if that fails."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            path = build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:  # a cached build that does not load (damaged, say): build it afresh, once
                log.warning("rebuilding %s: %s", path, e)
                path.unlink(missing_ok=True)
                lib = ctypes.CDLL(str(build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native LSTM kernels unavailable, using torch ops (slower): %s", e)
            return None
        ptr, n = ctypes.c_void_p, ctypes.c_long
        lib.lstm_step_forward.argtypes = [ptr] * 5 + [n] * 3
        lib.lstm_step_backward.argtypes = [ptr] * 4 + [n] + [ptr] * 3 + [n] * 2
        lib.lstm_step_forward.restype = lib.lstm_step_backward.restype = None
        _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available(t: Tensor) -> bool:
    """Whether the native kernels serve computations on t: float32 on the CPU, enabled and built."""
    return bool(_state["enabled"]) and t.dtype == torch.float32 and t.device.type == "cpu" and _load() is not None


def lstm_forward(hx: Tensor, cs: Tensor, tcs: Tensor, w_p: Tensor, bias: Tensor) -> list[Tensor]:
    """The LSTM's forward walk, filling h into hx, c into cs and tanh(c) into tcs; the gate activations.

    hx (T + 1, B, H + I) with x_t and h_0 already in place, cs (T + 1, B, H) with c_0, tcs (T, B, H),
    all contiguous; w_p the packed [W_h; W_x] (g columns x2), bias likewise -> per step (B, 4H).
    """
    step = _load().lstm_step_forward  # type: ignore[union-attr]
    T, (B, H) = tcs.shape[0], tcs.shape[1:]
    K, f4 = hx.shape[-1], 4  # row length of hx; bytes per float
    hx_p, cs_p, tcs_p = hx.data_ptr(), cs.data_ptr(), tcs.data_ptr()
    inputs, acts = hx.unbind(0), []
    for t in range(T):
        a = linear_sigmoid(inputs[t], w_p, bias)  # (B, 4H)
        if not a.is_contiguous():
            a = a.contiguous()
        c_prev = cs_p + t * B * H * f4
        step(a.data_ptr(), c_prev, c_prev + B * H * f4, tcs_p + t * B * H * f4,
             hx_p + (t + 1) * B * K * f4, B, H, K)
        acts.append(a)
    return acts


def lstm_backward(acts: list[Tensor], cs: Tensor, tcs: Tensor, g_h: Tensor | None, carry_h: Tensor,
                  carry_c: Tensor, w_p: Tensor, da: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM's reverse walk: fills da (T, B, 4H); returns the gradients at h_0 and c_0.

    g_h (T, B, H) is the gradient at every h_t (None: only the final state had one; any strides),
    carry_h and carry_c the gradients arriving at h_T and c_T (carry_c contiguous, updated in place),
    w_p the packed W_h.
    """
    step = _load().lstm_step_backward  # type: ignore[union-attr]
    T, (B, H), f4 = len(acts), tcs.shape[1:], 4
    if g_h is not None and g_h.stride(-1) != 1:
        g_h = g_h.contiguous()
    g_p, g_t, g_b = (0, 0, 0) if g_h is None else (g_h.data_ptr(), g_h.stride(0), g_h.stride(1))
    cs_p, tcs_p, da_p, cc_p = cs.data_ptr(), tcs.data_ptr(), da.data_ptr(), carry_c.data_ptr()
    carry_h = carry_h.contiguous()  # and every later one is a fresh GEMM output
    for t in range(T - 1, -1, -1):
        step(acts[t].data_ptr(), cs_p + t * B * H * f4, tcs_p + t * B * H * f4,
             (g_p + t * g_t * f4) if g_h is not None else None, g_b, carry_h.data_ptr(), cc_p,
             da_p + t * B * 4 * H * f4, B, H)
        carry_h = linear(da[t], w_p)  # (B, H)
    return carry_h, carry_c
