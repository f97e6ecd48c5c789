"""Execution-provider choice. Kept apart from sessions so the choice (and why) can be recorded in
diagnostics before anything runs."""

from __future__ import annotations

import onnxruntime as ort

from ..errors import ConfigError


def choose_providers(requested: str) -> tuple[list[str], str]:
    """Provider list for onnxruntime plus a sentence saying why, for the diagnostics."""
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if requested == "cuda":
        if not has_cuda:
            raise ConfigError(
                "provider='cuda' but this onnxruntime has no CUDAExecutionProvider (available: "
                f"{available}); install onnxruntime-gpu, or use provider='cpu'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA requested and available"
    if requested == "auto" and has_cuda and _gpu_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "auto: CUDA available and a GPU is present"
    why = "requested" if requested == "cpu" else "auto: no CUDA execution provider/GPU"
    return ["CPUExecutionProvider"], f"CPU ({why})"


def _gpu_present() -> bool:
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False
