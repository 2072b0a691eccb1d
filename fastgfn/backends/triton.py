"""The ``"triton"`` backend: the Triton GPU kernels (``kernels/*_triton.py``).

Same functions and signatures as :mod:`fastgfn.backends.reference`. Importing this module
imports triton; :func:`fastgfn.backends.get_backend` does so only when the backend is used.
"""

from __future__ import annotations

from fastgfn.kernels.linear_logprobs_triton import (
    linear_logprobs_backward,
    linear_logprobs_forward,
)
from fastgfn.kernels.logprobs_triton import logprobs_backward, logprobs_forward
from fastgfn.kernels.subtb_triton import subtb_backward, subtb_forward

__all__ = [
    "linear_logprobs_backward",
    "linear_logprobs_forward",
    "logprobs_backward",
    "logprobs_forward",
    "subtb_backward",
    "subtb_forward",
]
