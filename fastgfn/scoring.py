"""Per-position log-probs of sampled continuations: one teacher-forced pass per model.

For a prompt X shared by all rows and generated tokens z_1..z_T, the states are the prefixes
s_t = X z_1..z_t. One pass of the decoder over the prompt (batch 1, its KV cache expanded over
the batch, so the gradient through the shared prefix accumulates once) and one over the
generated tokens give the final hidden state at every state s_0..s_T. From these,

    log_pf[b, t]    = log q(z_{t+1} | s_t)   t = 0..T-1
    log_pterm[b, t] = log q(STOP    | s_t)   t = 0..T

through the per-token log-prob op (the lm_head matmul, log-softmax and gather; see DESIGN
2.1). ``head_logprobs`` is the one call that selects the implementation: the fused op
through the model's own output layer (``fastgfn.lm_head_logprobs``), or the lm_head module on
the needed positions only (ZeRO-3-partitioned weights, or ``use_fused=False``).
"""

from __future__ import annotations

import torch

from fastgfn.sampler import cache_kwarg, expand_cache, output_cache


def token_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    extra_ids: list[int],
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
):
    """Reference: ``hidden [N, H]``, ``weight [V, H]`` -> (logp of ``target`` [N], logp of
    each extra id [N, K]), in float32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    if vocab_bias is not None:
        logits = logits + vocab_bias.to(logits)
    logp = torch.log_softmax(logits, dim=-1)
    tgt = logp.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    ext = logp[:, list(extra_ids)]
    return tgt, ext


def head_logprobs(model, hidden, target, extra_ids, *, temperature=1.0, vocab_bias=None,
                  use_fused: bool = True):
    """Log-prob of ``target`` and of ``extra_ids`` at every row of ``hidden [N, H]`` under the
    model's own output layer (tied weights, logit scaling and final softcapping respected).

    Fused (the ``[N, V]`` logits never exist) unless ``use_fused=False`` or the lm_head weight
    is ZeRO-3-partitioned; then the lm_head module is called (DeepSpeed gathers its weight)
    and the logits of these rows are materialised.
    """
    from fastgfn.lm_logprobs import lm_head_logprobs, output_layer_spec

    spec = output_layer_spec(model)
    if use_fused and getattr(spec["weight"], "ds_numel", None) is None:
        out = lm_head_logprobs(model, hidden, target, list(extra_ids), temperature=temperature,
                               vocab_bias=vocab_bias)
        return out.logp, out.extra
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * spec["scale"]
    if spec["softcap"]:
        logits = spec["softcap"] * torch.tanh(logits / spec["softcap"])
    if temperature != 1.0:
        logits = logits / temperature
    if vocab_bias is not None:
        logits = logits + vocab_bias.to(logits)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, target.clamp_min(0)[:, None]).squeeze(1), logp[:, list(extra_ids)]


def hidden_states(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, *,
                  return_cache: bool = False):
    """Final hidden states at states s_0..s_T: ``[B, T+1, H]``. The prompt (1-D) runs once.
    With ``return_cache``: ``(hidden, cache)``, the KV cache of prompt + tokens per row."""
    decoder = model.get_decoder()
    B = tokens.shape[0]
    out = decoder(input_ids=prompt_ids[None], use_cache=True)
    h0 = out.last_hidden_state[:, -1:]  # [1, 1, H]: state s_0
    cache = expand_cache(output_cache(out), B)
    kw = cache_kwarg(model)
    out = decoder(input_ids=tokens, use_cache=True, **{kw: cache})
    h = torch.cat([h0.expand(B, 1, h0.shape[-1]), out.last_hidden_state], dim=1)
    return (h, output_cache(out)) if return_cache else h


def gfn_logprobs(
    model,
    prompt_ids: torch.Tensor,
    tokens: torch.Tensor,
    termination_token_id: int,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    use_fused: bool = True,
):
    """``(log_pf [B, T], log_pterm [B, T+1])`` of ``tokens [B, T]`` continuing ``prompt_ids``.

    Entries past a row's length are computed on padding and must be masked by the loss.
    """
    h = hidden_states(model, prompt_ids, tokens)  # [B, T+1, H]
    return gfn_logprobs_from_hidden(model, h, tokens, termination_token_id,
                                    temperature=temperature, vocab_bias=vocab_bias,
                                    use_fused=use_fused)


def gfn_logprobs_from_hidden(
    model,
    h: torch.Tensor,
    tokens: torch.Tensor,
    termination_token_id: int,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    use_fused: bool = True,
):
    """:func:`gfn_logprobs` from the hidden states ``h [B, T+1, H]`` of :func:`hidden_states`."""
    B, T = tokens.shape
    H = h.shape[-1]
    target = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # last state has no next token
    tgt, ext = head_logprobs(
        model,
        h.reshape(B * (T + 1), H),
        target.reshape(-1),
        [termination_token_id],
        temperature=temperature,
        vocab_bias=vocab_bias,
        use_fused=use_fused,
    )
    return tgt.view(B, T + 1)[:, :T], ext[:, 0].view(B, T + 1)


@torch.no_grad()
def frozen_prefix_logrewards(
    model,
    prompt_ids,
    tokens,
    termination_token_id,
    *,
    temperature: float = 1.0,
    use_fused: bool = True,
):
    """Reward of every prefix under a frozen LM: ``log p(s_t STOP | X)`` for t = 0..T
    (``[B, T+1]``), the cumulative token log-prob plus the termination log-prob."""
    log_pf, log_pterm = gfn_logprobs(
        model,
        prompt_ids,
        tokens,
        termination_token_id,
        temperature=temperature,
        use_fused=use_fused,
    )
    cum = torch.cat([log_pf.new_zeros(log_pf.shape[0], 1), log_pf.cumsum(1)], dim=1)
    return cum + log_pterm
