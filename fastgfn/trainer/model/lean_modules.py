"""The teacher-forced pass with gradient on the lean layers (``lean_layers``).

Inside ``lean_teacher_forced_layers(model)`` the decoder layers of a Llama, Mistral or Qwen2
model run their two RMSNorms, their SwiGLU MLP and (under autocast) their attention
projections through ``lean_layers``: the same values, fewer tensors kept for the backward.
The forwards are swapped on the module instances for the duration of the context and restored
after it, so the reward pass, sampling, evaluation and saving see transformers' modules.

Nothing is swapped where it would not be the same maths or could interfere: other model
types, a module that is not exactly transformers' (a LoRA layer, a bias in the MLP, another
activation), a module whose forward is already replaced on the instance (accelerate's hooks),
parameters partitioned by DeepSpeed ZeRO-3, gradient checkpointing (its recomputation runs
after the context), or no gradient. ``FASTGFN_LEAN_LAYERS=0`` turns it
off (for A/B measurements).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from fastgfn.lm_logprobs import autocast_matmul_dtype
from fastgfn.trainer.model.lean_layers import linear, rms_norm, swiglu_mlp

MODEL_TYPES = ("llama", "mistral", "qwen2")
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_SILU = ("SiLUActivation", "SiLU")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def enabled() -> bool:
    """Whether the lean layers are on (``FASTGFN_LEAN_LAYERS``, default on)."""
    return os.environ.get("FASTGFN_LEAN_LAYERS", "1") != "0"


def _free(module) -> bool:
    """A module whose forward has not been replaced on the instance."""
    return "forward" not in module.__dict__


def _plain_linear(module, bias_ok: bool) -> bool:
    return type(module) is nn.Linear and _free(module) and (bias_ok or module.bias is None)


def _checkpointing(model) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on for ``model``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old name
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def _norm_forward(norm):
    def forward(hidden_states):
        dtype = autocast_matmul_dtype(hidden_states, norm.weight)  # what its linears take
        out_dtype = None if dtype == norm.weight.dtype else dtype
        return rms_norm(hidden_states, norm.weight, norm.variance_epsilon, out_dtype)
    return forward


def _mlp_forward(mlp):
    def forward(x):
        return swiglu_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    return forward


def _linear_forward(module):
    def forward(x):
        return linear(x, module.weight, module.bias)
    return forward


def lean_forwards(model) -> list[tuple[nn.Module, object]]:
    """(module, forward) pairs to swap in for ``model``'s teacher-forced pass; empty where
    the lean layers do not apply (see the module's text)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return []
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return []  # ZeRO-3 gathers and releases the parameters around each module
    if _checkpointing(model):
        return []  # its recomputation in the backward runs outside the context
    decoder = model.get_decoder()
    swaps = []
    for layer in getattr(decoder, "layers", ()):
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if type(norm).__name__ in _NORMS and _free(norm) and hasattr(norm,
                                                                          "variance_epsilon"):
                swaps.append((norm, _norm_forward(norm)))
        mlp = getattr(layer, "mlp", None)
        if (mlp is not None and _free(mlp)
                and all(_plain_linear(getattr(mlp, n, None), bias_ok=False)
                        for n in ("gate_proj", "up_proj", "down_proj"))
                and type(getattr(mlp, "act_fn", None)).__name__ in _SILU):
            swaps.append((mlp, _mlp_forward(mlp)))
        attn = getattr(layer, "self_attn", None)
        for name in _PROJECTIONS:
            proj = getattr(attn, name, None)
            if _plain_linear(proj, bias_ok=True):
                swaps.append((proj, _linear_forward(proj)))
    return swaps


@contextlib.contextmanager
def lean_teacher_forced_layers(model):
    """Run ``model``'s decoder layers on the lean layers inside the context, with gradient."""
    swaps = lean_forwards(model) if enabled() and torch.is_grad_enabled() else []
    for module, forward in swaps:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in swaps:
            del module.forward
