"""Per-token log-probs of a Hugging Face causal LM: hidden states -> (log_pf, log_pterm).

:func:`lm_head_logprobs` applies a model's own output layer -- its lm_head weight (tied to the
input embeddings or not), its bias if any, its final logit softcapping (Gemma 2/3) and its
logit scaling (Cohere ``logit_scale``, Granite ``logits_scaling``) -- to hidden states. Fused
(the default) it goes through :func:`fastgfn.linear_token_logprobs`, so the ``[tokens,
vocab]`` logits are never formed; unfused (``fused=False``, or an lm_head weight that
DeepSpeed ZeRO-3 has partitioned) it calls the lm_head module and then
:func:`fastgfn.token_logprobs` on its logits. Either way the softmax maths is the op's.

:func:`gfn_logprobs_from_hidden` gives the two per-position inputs of the GFlowNet losses
(docs/MATH.md §4) from the final hidden states at the states s_0..s_T of a continuation:
``log_pf[:, t]``, the log-prob of generated token t + 1, and ``log_pterm[:, t]``, the log-prob
of the termination token at s_t. :func:`causal_lm_gfn_logprobs` runs the model body once over
``prompt + generated`` ids and hands the T + 1 states that predict a generated token or
termination to it. (The training engine's scoring computes the states with the prompt run
once for the whole batch, then calls the same function.)

transformers is never imported here: any model object with ``get_output_embeddings()``,
``base_model`` and ``config`` works.
"""

from __future__ import annotations

import torch

from fastgfn.ops.logprobs import TokenLogProbs, linear_token_logprobs, token_logprobs

__all__ = [
    "causal_lm_gfn_logprobs",
    "gfn_logprobs_from_hidden",
    "lm_head_logprobs",
    "output_layer_spec",
]


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def output_layer_spec(model) -> dict:
    """The model's output layer as ``z = scale * (h W^T + b)`` followed by an optional softcap.

    Returns ``dict(weight, bias, scale, softcap)``.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) layer")
    config = _text_config(model.config)
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(logit_scale, (int, float)) and logit_scale not in (0, 1):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(logits_scaling, (int, float)) and logits_scaling not in (0, 1):
        scale /= float(logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {
        "weight": head.weight,
        "bias": getattr(head, "bias", None),
        "scale": scale,
        "softcap": float(softcap) if softcap else None,
    }


def autocast_matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a product of ``hidden`` with ``weight`` takes its operands in: the weight's,
    or under ``torch.autocast`` on hidden's device the autocast dtype for fp32 (master)
    weights, as ``F.linear`` would. The fused head then keeps the weight fp32 and rounds it
    inside the op, so its gradient comes back fp32 (the lean layers do the same)."""
    device = hidden.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return weight.dtype


def lm_head_logprobs(
    model,
    hidden: torch.Tensor,
    target: torch.Tensor,
    extra_ids=None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    fused: bool = True,
    backend: str = "auto",
) -> TokenLogProbs:
    """Log-probs under ``model``'s output layer for final hidden states ``hidden [..., H]``.

    Equivalent to ``log_softmax(model.lm_head(hidden) [scaled, softcapped] / temperature +
    vocab_bias)`` gathered at ``target`` and ``extra_ids``. ``fused=True`` never forms the
    ``[..., V]`` logits; ``fused=False``, or an lm_head weight partitioned by DeepSpeed ZeRO-3
    (which only the module's own forward gathers), materialises them through the module.
    """
    spec = output_layer_spec(model)
    weight, bias = spec["weight"], spec["bias"]
    options = dict(temperature=temperature, vocab_bias=vocab_bias, softcap=spec["softcap"],
                   ignore_index=ignore_index, return_entropy=return_entropy,
                   return_lse=return_lse, backend=backend)
    if not fused or getattr(weight, "ds_numel", None) is not None:
        logits = model.get_output_embeddings()(hidden)
        if spec["scale"] != 1.0:
            logits = logits * spec["scale"]
        return token_logprobs(logits, target, extra_ids, **options)
    hidden = hidden.to(autocast_matmul_dtype(hidden, weight))
    if spec["scale"] != 1.0:  # s (h W^T + b) = (s h) W^T + s b: scale the small operands
        hidden = hidden * spec["scale"]
        bias = bias * spec["scale"] if bias is not None else None
    return linear_token_logprobs(hidden, weight, target, bias, extra_ids, **options)


def gfn_logprobs_from_hidden(
    model,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    termination_token_id: int,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    fused: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_pf [B, T], log_pterm [B, T + 1])`` from the final hidden states ``hidden [B, T + 1,
    H]`` at the states s_0..s_T of the generated ``tokens [B, T]`` (``hidden[:, t]`` is the
    state after t generated tokens). Entries past a row's length are computed on whatever the
    padding holds; the losses never read them."""
    B, T = tokens.shape
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, T + 1):
        raise ValueError(
            f"hidden must have shape ({B}, {T + 1}, H) for tokens of shape {(B, T)}, got "
            f"{tuple(hidden.shape)}"
        )
    ignore = -100  # the last state predicts no generated token, only termination
    target = torch.cat([tokens, tokens.new_full((B, 1), ignore)], dim=1)
    out = lm_head_logprobs(model, hidden, target, [int(termination_token_id)],
                           temperature=temperature, vocab_bias=vocab_bias, ignore_index=ignore,
                           fused=fused, backend=backend)
    return out.logp[:, :T], out.extra[..., 0]


def _body_hidden_states(model, input_ids, attention_mask):
    body = model.base_model
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        # left padding: positions count real tokens only
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = body(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_gfn_logprobs(
    model,
    input_ids: torch.Tensor,
    prompt_len: int,
    termination_token_id: int,
    attention_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    fused: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_pf [B, T], log_pterm [B, T + 1])`` for ``input_ids [B, prompt_len + T]``.

    ``log_pf[:, t] = log q(input_ids[:, prompt_len + t] | input_ids[:, :prompt_len + t])`` and
    ``log_pterm[:, t] = log q(termination | input_ids[:, :prompt_len + t])``, with the policy
    ``q`` = the model's next-token distribution at ``temperature`` plus ``vocab_bias``.
    Positions past a sequence's end (padding) hold finite values that the losses ignore.
    Differentiable with respect to the model's parameters.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, prompt_len + T] integer tensor")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int):
        raise TypeError(f"prompt_len must be an int, got {type(prompt_len).__name__}")
    B, L = input_ids.shape
    if not 1 <= prompt_len <= L:
        raise ValueError(f"prompt_len must lie in [1, {L}] (input_ids has {L} columns)")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
        raise ValueError(
            f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}"
        )
    hidden = _body_hidden_states(model, input_ids, attention_mask)
    # hidden[:, j] predicts token j + 1: positions prompt_len - 1 .. L - 1 are the T + 1 states
    return gfn_logprobs_from_hidden(model, hidden[:, prompt_len - 1 :], input_ids[:, prompt_len:],
                                    termination_token_id, temperature=temperature,
                                    vocab_bias=vocab_bias, fused=fused, backend=backend)
