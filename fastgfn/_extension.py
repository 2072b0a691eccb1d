"""Loading the C++ CPU kernels (``fastgfn/_C*.so``, built from ``kernels/cpu`` by CMake).

The library registers its ops under ``torch.ops.fastgfn_cpu``. It is loaded on first use, not
at import. When it is missing (no tool chain at install time, ``FASTGFN_SKIP_CPP=1``) fastgfn
falls back to the PyTorch reference and warns once.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def cpu_kernels_available() -> bool:
    """True when the C++ CPU kernels are built and loaded (loads them on first call)."""
    if os.environ.get("FASTGFN_DISABLE_CPP") == "1":
        return False
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")))
    for path in candidates:
        try:
            torch.ops.load_library(path)
            return True
        except OSError as exc:  # stale or ABI-incompatible build
            warnings.warn(f"fastgfn: could not load {path}: {exc}", stacklevel=2)
    return False


@functools.lru_cache(maxsize=None)
def warn_cpu_fallback() -> None:
    """Say once that CPU tensors go to the PyTorch reference instead of the C++ kernels."""
    warnings.warn(
        "fastgfn: the C++ CPU kernels are not built (reinstall with a C++ tool chain and cmake); "
        "CPU tensors use the PyTorch reference implementation instead.",
        RuntimeWarning,
        stacklevel=3,
    )
