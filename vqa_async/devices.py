"""Which device `--device auto` means, answered without importing torch where torch is not loaded yet.

`vqa-async cluster` resolves `auto` for its workers (their batch size and HAProxy's per-worker connections depend
on it) and must not pay for torch to do so. torch says cuda when it was built with CUDA and the driver reports a
device; so does this: a CUDA build of torch is one with libtorch_cuda.so, and the driver is asked in a child
process (cuInit, cuDeviceGetCount: what CUDA_VISIBLE_DEVICES leaves), so that the caller never maps libcuda.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

_ASK_DRIVER = """
import ctypes
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    print(0)
else:
    n = ctypes.c_int(0)
    print(n.value if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0)
"""


def _torch_has_cuda() -> bool:
    spec = importlib.util.find_spec("torch")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "lib" / "libtorch_cuda.so").exists() for p in spec.submodule_search_locations)


def cuda_available() -> bool:
    if "torch" in sys.modules:  # `serve` has it loaded already: ask it
        import torch

        return bool(torch.cuda.is_available())
    if not _torch_has_cuda():
        return False
    try:
        done = subprocess.run([sys.executable, "-c", _ASK_DRIVER], capture_output=True, text=True, timeout=60)
        return int(done.stdout.strip() or 0) > 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"
