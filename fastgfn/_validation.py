"""Argument checks shared by the public API. Errors name the offending argument.

Shape, dtype and device checks always run (they cost no host sync). Checks of tensor values
(for example that lengths lie in [0, T]) run on CPU tensors always and on accelerator tensors
only in debug mode (``fastgfn.set_debug(True)`` or ``FASTGFN_DEBUG=1``), because reading a
value back from the device would stall the stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_DEBUG = os.environ.get("FASTGFN_DEBUG", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_debug(enabled: bool) -> None:
    """Turn on value checks that need a device-to-host sync on accelerator tensors."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Whether reading values of ``t`` is allowed (no sync, not tracing)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return t.device.type == "cpu" or _DEBUG


def check_tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                "all inputs must be on one device"
            )


def as_index_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    """Accept an integer tensor or a sequence of ints; reject floats and bools."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        return value
    if isinstance(value, Sequence) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return torch.tensor(list(value), dtype=torch.long, device=device)
    raise TypeError(f"{name} must be an integer tensor or a sequence of ints")


def check_positive_number(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value
