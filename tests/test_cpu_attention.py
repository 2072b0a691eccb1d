"""The teacher-forced pass's SDPA kernel on the CPU (fastgfn/trainer/model/cpu_attention.py):
the math kernel where its attention weights fit the budget, flash elsewhere, the same hidden
states and gradients either way."""

from __future__ import annotations

import pytest
import torch

from fastgfn.trainer.model import cpu_attention
from fastgfn.trainer.scoring import hidden_states

transformers = pytest.importorskip("transformers")

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).double()


def _pass(model, prompt, tokens):
    """Hidden states, the gradient of a random projection w.r.t. every weight, and the
    profiler's operator names."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        h = hidden_states(model, prompt, tokens)
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
        (h * g).sum().backward()
    names = {e.key for e in prof.key_averages()}
    grads = [p.grad.clone() for p in model.get_decoder().parameters()]
    return h.detach(), grads, names


def test_math_kernel_where_the_weights_fit_same_results_as_flash(monkeypatch):
    model = _model()
    prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(3, 97, (5, 6), generator=torch.Generator().manual_seed(3))
    need = cpu_attention.math_attention_bytes(model.config, 5, 6, 13)
    assert need == 4 * 2 * 5 * 4 * 6 * 13
    h_math, g_math, ops_math = _pass(model, prompt, tokens)
    monkeypatch.setattr(cpu_attention, "MATH_WEIGHTS_BUDGET", need - 1)  # the token pass: flash
    h_flash, g_flash, ops_flash = _pass(model, prompt, tokens)
    assert FLASH not in ops_math and FLASH in ops_flash
    torch.testing.assert_close(h_math, h_flash, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_math, g_flash):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_flash_kernel_without_gradient_or_past_the_budget():
    model = _model()
    cfg = model.config
    chosen = cpu_attention.teacher_forced_attention(model, 4, 8, 16)
    assert not isinstance(chosen, type(cpu_attention.contextlib.nullcontext()))
    with torch.no_grad():
        chosen = cpu_attention.teacher_forced_attention(model, 4, 8, 16)
    assert isinstance(chosen, type(cpu_attention.contextlib.nullcontext()))
    long = 1024  # 4 B x 2 layers x 4 heads x 1024 x 2048 = 128 MiB > 64 MiB
    assert cpu_attention.math_attention_bytes(cfg, 4, long, 2 * long) > \
        cpu_attention.MATH_WEIGHTS_BUDGET
    chosen = cpu_attention.teacher_forced_attention(model, 4, long, 2 * long)
    assert isinstance(chosen, type(cpu_attention.contextlib.nullcontext()))
    cfg._attn_implementation = "eager"
    chosen = cpu_attention.teacher_forced_attention(model, 4, 8, 16)
    assert isinstance(chosen, type(cpu_attention.contextlib.nullcontext()))
