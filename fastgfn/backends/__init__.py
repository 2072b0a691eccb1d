"""Where a backend gets chosen: the one table of implementations and ``backend="auto"``.

Every op of fastgfn has three implementations, one module each, all exposing the same
functions with the same signatures (``subtb_forward``/``subtb_backward``,
``logprobs_forward``/``logprobs_backward``, ``linear_logprobs_forward``/
``linear_logprobs_backward``; see :mod:`fastgfn.backends.reference` for the contract):

- ``"reference"``: :mod:`fastgfn.backends.reference`, the readable PyTorch maths;
- ``"cpp"``: :mod:`fastgfn.backends.cpp`, the C++ CPU kernels (``kernels/cpu``);
- ``"triton"``: :mod:`fastgfn.backends.triton`, the Triton GPU kernels (``kernels/*_triton.py``).

:func:`resolve_backend` maps a requested name and the inputs' device to the implementation
that runs: ``"auto"`` picks Triton for CUDA tensors, the C++ kernels for CPU tensors (the
reference when they are not built, with a one-time ``RuntimeWarning``). The public functions
resolve *before* calling their registered op, so the op receives a concrete name and
:func:`get_backend` turns it into the module inside the op body (outside autograd and outside
what ``torch.compile`` traces). The Triton backend accepts CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1``), which is how CI runs the GPU kernels.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from fastgfn._extension import cpu_kernels_available, warn_cpu_fallback
from fastgfn.backends.options import GradsNeeded, LogProbOptions, OutputGrads

__all__ = [
    "BACKENDS",
    "GradsNeeded",
    "IMPLEMENTATIONS",
    "LogProbOptions",
    "OutputGrads",
    "get_backend",
    "resolve_backend",
    "triton_interpreter_enabled",
]

BACKENDS = ("auto", "reference", "cpp", "triton")
# implementation name -> module (imported on first use: the Triton one imports triton)
IMPLEMENTATIONS = {
    "reference": "fastgfn.backends.reference",
    "cpp": "fastgfn.backends.cpp",
    "triton": "fastgfn.backends.triton",
}


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend and the inputs' device to the implementation that runs."""
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and cpu_kernels_available():
            return "cpp"
        if device.type == "cpu":
            warn_cpu_fallback()
        return "reference"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {device}")
        if not cpu_kernels_available():
            raise RuntimeError("backend='cpp' requested but the C++ CPU kernels are not built")
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); "
            "set TRITON_INTERPRET=1 before importing fastgfn to run it on the CPU"
        )
    return backend


def get_backend(name: str) -> ModuleType:
    """The module implementing a resolved backend name ('reference', 'cpp' or 'triton')."""
    try:
        return importlib.import_module(IMPLEMENTATIONS[name])
    except KeyError:
        raise ValueError(
            f"unknown implementation {name!r}; one of {tuple(IMPLEMENTATIONS)}"
        ) from None
    except ImportError as exc:
        if exc.name != "triton":
            raise
        raise RuntimeError(
            "the Triton backend needs triton: pip install 'fastgfn[gpu]' (triton==3.7.1)"
        ) from exc
