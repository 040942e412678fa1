"""Pick the onnxruntime execution provider: CUDA when a usable GPU is present, else CPU, quietly."""
from __future__ import annotations

import ctypes
import logging

import onnxruntime as ort

log = logging.getLogger(__name__)

# What the CUDA provider of onnxruntime-gpu links against (CUDA 12 or 13 builds).
_CUDA_LIBS = (("libcudart.so.13", "libcudart.so.12"), ("libcublas.so.13", "libcublas.so.12"),
              ("libcublasLt.so.13", "libcublasLt.so.12"))


def _load_any(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def _gpu_count() -> tuple[int, str]:
    """Ask the CUDA driver directly how many devices it sees (no onnxruntime noise)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA driver (libcuda.so.1 not loadable)"
    if cuda.cuInit(0) != 0:
        return 0, "the CUDA driver failed to initialise"
    n = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value < 1:
        return 0, "the CUDA driver sees no device"
    return n.value, f"{n.value} CUDA device(s)"


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider would really run here, and why (not)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    count, why = _gpu_count()
    if count == 0:
        return False, why
    for names in _CUDA_LIBS:
        if _load_any(names) is None:
            return False, f"{why} but the CUDA runtime library {names[0]} is missing"
    return True, why


def choose(device: str) -> tuple[list[str], str]:
    """Providers for `device` (auto|cpu|cuda) and the reason; raises RuntimeError if cuda is forced but unusable."""
    ort.set_default_logger_severity(3)  # errors only: no provider fallback chatter
    if device == "cpu":
        return ["CPUExecutionProvider"], "--device cpu"
    ok, why = cuda_usable()
    if ok:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], why
    if device == "cuda":
        raise RuntimeError(f"--device cuda but CUDA is not usable: {why}")
    return ["CPUExecutionProvider"], why
