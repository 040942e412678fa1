"""Pick the onnxruntime execution provider: CUDA when a usable GPU is present, else CPU, quietly."""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

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


def _provider_loads() -> str | None:
    """Load onnxruntime's CUDA provider library ourselves: None if its CUDA libraries resolve, else why not."""
    capi = Path(ort.__file__).parent / "capi"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:  # CUDA/cuDNN from the nvidia-* wheels, when installed that way (prints on failure: captured)
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001  (absent in older builds, or nothing to preload)
            log.debug("preload_dlls: %s", e)
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as e:
        if "cannot open shared object file" in str(e):  # a CUDA library it links is missing
            return str(e).split(":")[0] + " is missing"
    return None  # other errors (symbols onnxruntime binds itself) do not predict a failure


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA provider would really run here, and why (not), without onnxruntime's noise."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    count, why = _gpu_count()
    if count == 0:
        return False, why
    missing = _provider_loads()
    if missing:
        return False, f"{why} but the CUDA provider cannot load: {missing}"
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
        raise RuntimeError(f"--device cuda but CUDA is not usable: {why}; is a GPU visible here (in a container: the NVIDIA Container Toolkit and the GPU reservation)? --device auto falls back to the CPU")
    return ["CPUExecutionProvider"], why
