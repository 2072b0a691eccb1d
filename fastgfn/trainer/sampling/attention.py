"""Decode-time attention for grouped-query models on a CPU: one query token per row.

With grouped-query attention (``n_heads = groups * n_kv_heads``) and a single query token,
the ``groups`` query heads that share a key/value head are just ``groups`` query rows against
the same keys:

    q [B, n_heads, 1, D]  ->  q [B, n_kv_heads, groups, D]
    out = softmax(q k^T * scale) v        (k, v: [B, n_kv_heads, S, D], never repeated)

Transformers' SDPA path instead passes ``enable_gqa=True`` on a CPU whenever there is no
mask, and PyTorch's CPU kernels then repeat the keys and values ``groups`` times (timings in
bench/RESULTS.md, "End-to-end step").

``packed_decode_attention(model)`` is a context manager that routes the model's attention
through ``packed_gqa_sdpa`` while it is open. It changes nothing where packing does not
apply (not SDPA, a float32 model — whose flash kernel already handles GQA well — a model on
an accelerator, or no grouped heads); calls with a mask or several query tokens go to
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import contextlib

import torch

ATTENTION_NAME = "fastgfn_packed_gqa_sdpa"


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    **kwargs):
    """Transformers attention interface: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, S, D]``
    -> ``(out [B, L, Hq, D], None)``; packs grouped query heads when ``L == 1``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    B, n_heads, q_len, head_dim = query.shape
    if (q_len != 1 or groups == 1 or attention_mask is not None or dropout
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    packed = query.reshape(B, n_heads // groups, groups, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(out.shape[0], n_heads, 1, value.shape[-1]).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, packed_gqa_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _packing_helps(model) -> bool:
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    if config is None or param is None:
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and param.device.type == "cpu"
        and param.dtype in (torch.bfloat16, torch.float16)
        and heads is not None
        and heads != kv_heads
    )


@contextlib.contextmanager
def packed_decode_attention(model):
    """Route ``model``'s attention through ``packed_gqa_sdpa`` inside the block (where it
    helps; see the module docstring). The original implementation is restored on exit."""
    if not _packing_helps(model):
        yield
        return
    _register()
    config = model.config
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
