"""``mixed_precision``: bf16 compute with fp32 master weights in one plain process.

With ``mixed_precision: bf16`` (and ``dtype: float32``) the policy, its AdamW state and the
gradients stay fp32; a training micro-step (sampling, the frozen reward pass, the policy's
teacher-forced pass and the loss) runs under ``torch.autocast(bfloat16)``, so matmuls take
bf16 inputs and accumulate in fp32, and the backward follows the forward's dtypes. The fused
log-prob and SubTB ops compute in fp32 whatever their inputs' dtype, so log-probs, rewards and
the loss are fp32 tensors. This pays on GPUs and on CPUs with native bf16 matmuls (AMX,
AVX512-BF16); on a CPU without them bf16 matmuls are emulated and slower than fp32.
Under DeepSpeed, mixed precision is DeepSpeed's own (its ``bf16`` section).
"""

from __future__ import annotations

import contextlib

import torch

MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16}


def autocast(mixed_precision: str, device: torch.device):
    """The context a training micro-step runs in: autocast to the dtype of
    ``mixed_precision`` (the model section's key), or nothing (``"no"``)."""
    dtype = MIXED_PRECISION_DTYPES.get(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
