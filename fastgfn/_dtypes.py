"""The dtype every backend accumulates and returns in (docs/MATH.md §1, §2): float64 when
any input is float64, float32 otherwise (16-bit inputs included). Imported by the ops and by
the Triton launchers alike, so the rule lives in one place."""

from __future__ import annotations

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any of ``tensors`` is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
