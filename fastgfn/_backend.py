"""Choosing an implementation for an op: 'reference', 'cpp' or 'triton'.

``backend="auto"`` picks Triton for CUDA tensors, the C++ kernels for CPU tensors (the
reference when they are not built, with a one-time warning). Tests and benchmarks name a
backend explicitly. The Triton backend accepts CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how CI runs the GPU kernels.
"""

from __future__ import annotations

import importlib
import os

import torch

from fastgfn._extension import cpu_kernels_available, warn_cpu_fallback

BACKENDS = ("auto", "reference", "cpp", "triton")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend and the inputs' device to the implementation that runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def triton_kernels(module: str):
    """Import ``fastgfn.kernels.<module>`` (a Triton kernel file), or say how to get triton."""
    try:
        return importlib.import_module(f"fastgfn.kernels.{module}")
    except ImportError as exc:
        if exc.name != "triton":
            raise
        raise RuntimeError(
            "the Triton backend needs triton: pip install 'fastgfn[gpu]' (triton==3.7.1)"
        ) from exc
