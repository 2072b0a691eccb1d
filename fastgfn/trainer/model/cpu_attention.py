"""Which SDPA kernel the teacher-forced pass with gradient uses on the CPU.

PyTorch's CPU SDPA picks its flash kernel for any shape. It keeps only each row's logsumexp
for the backward and recomputes the attention weights there, in blocks sized for long
sequences; with the short queries of a GFlowNet step (T new tokens against prompt + T keys)
the recomputation and blocking cost more than they save. The math kernel materialises the
weights, ``layers x B x heads x T x (P + T)`` values kept for the backward, and its backward
is a few batched matmuls: on bench_step's workload (SmolLM2-135M, batch 16, 30 tokens after a
26-token prompt: 29 MB of weights over the 30 layers) the bf16 backward went from 1.65 s to
1.22-1.35 s on 2 cores of a Zen 4 EPYC and from 0.92 s to 0.77 s on an AMX Xeon, the forward
unchanged (bench/RESULTS.md, issue 18).

So the math kernel is chosen where those weights fit ``MATH_WEIGHTS_BUDGET`` bytes (counted
at 4 bytes a value) and flash elsewhere, so a long sequence never materialises T x T
weights per layer. Only for the CPU, with gradient, and where the model runs PyTorch SDPA.
"""

from __future__ import annotations

import contextlib

import torch

MATH_WEIGHTS_BUDGET = 64 * 2**20  # bytes of attention weights kept for the backward


def math_attention_bytes(config, batch: int, queries: int, keys: int) -> int:
    """Bytes of the attention weights the math kernel keeps over all layers (fp32)."""
    return 4 * config.num_hidden_layers * batch * config.num_attention_heads * queries * keys


def teacher_forced_attention(model, batch: int, queries: int, keys: int):
    """A context for one teacher-forced pass of ``batch`` rows, ``queries`` new positions
    against ``keys`` positions: the math SDPA kernel where it pays (see the module's text),
    else nothing."""
    config = model.config
    param = next(model.parameters(), None)
    if (param is None or param.device.type != "cpu" or not torch.is_grad_enabled()
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or math_attention_bytes(config, batch, queries, keys) > MATH_WEIGHTS_BUDGET):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
