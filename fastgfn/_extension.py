"""Loading the C++ CPU kernels (``fastgfn/_C*.so``, built from ``kernels/cpu`` by CMake).

The library registers its ops under ``torch.ops.fastgfn_cpu``. It is loaded when fastgfn is
imported (a few milliseconds; it depends on libtorch only), so that backend selection is a
plain constant that ``torch.compile`` can trace. When the library is missing (no tool chain
at install time, ``FASTGFN_SKIP_CPP=1``) or disabled (``FASTGFN_DISABLE_CPP=1``), fastgfn
falls back to the PyTorch reference and warns once, on first use.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _load_cpu_kernels() -> bool:
    if os.environ.get("FASTGFN_DISABLE_CPP") == "1":
        return False
    for path in sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so"))):
        try:
            torch.ops.load_library(path)
            return True
        except OSError as exc:  # stale or ABI-incompatible build
            warnings.warn(f"fastgfn: could not load {path}: {exc}", stacklevel=2)
    return False


_CPU_KERNELS_LOADED = _load_cpu_kernels()


def cpu_kernels_available() -> bool:
    """True when the C++ CPU kernels are built and loaded."""
    return _CPU_KERNELS_LOADED


def require_cpu_kernels() -> None:
    """Raise unless the C++ kernels are loaded: for code paths that asked for them explicitly."""
    if not _CPU_KERNELS_LOADED:
        raise RuntimeError("the fastgfn C++ CPU kernels are not built (see README: installing)")


@functools.cache
def _warn_cpu_fallback_once() -> None:
    warnings.warn(
        "fastgfn: the C++ CPU kernels are not built (reinstall with a C++ tool chain and cmake); "
        "CPU tensors use the PyTorch reference implementation instead.",
        RuntimeWarning,
        stacklevel=4,
    )


def warn_cpu_fallback() -> None:
    """Say once that CPU tensors go to the PyTorch reference instead of the C++ kernels."""
    if not torch.compiler.is_compiling():
        _warn_cpu_fallback_once()
