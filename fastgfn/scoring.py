"""Per-position log-probs of sampled continuations: one teacher-forced pass per model.

For a prompt X shared by all rows and generated tokens z_1..z_T, the states are the prefixes
s_t = X z_1..z_t. One pass of the decoder over the prompt (batch 1, its KV cache expanded over
the batch, so the gradient through the shared prefix accumulates once) and one over the
generated tokens give the final hidden state at every state s_0..s_T. From these,

    log_pf[b, t]    = log q(z_{t+1} | s_t)   t = 0..T-1
    log_pterm[b, t] = log q(STOP    | s_t)   t = 0..T

through the per-token log-prob op (the lm_head matmul, log-softmax and gather; see DESIGN
2.1). ``token_logprobs`` is the one call that selects the implementation: the fused op from
``fastgfn.ops.logprobs`` when it is available, otherwise a reference that materialises the
logits of the needed positions only.
"""

from __future__ import annotations

import torch

from fastgfn.sampler import cache_kwarg, expand_cache, output_cache


def _fused_op():
    try:
        from fastgfn.ops.logprobs import linear_token_logprobs
    except ImportError:
        return None
    return linear_token_logprobs


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


def token_logprobs(
    hidden,
    weight,
    target,
    extra_ids,
    *,
    bias=None,
    temperature=1.0,
    vocab_bias=None,
    use_fused: bool = True,
):
    """Log-prob of ``target`` and of ``extra_ids`` at every row of ``hidden``."""
    op = _fused_op() if use_fused else None
    if op is not None and getattr(weight, "ds_numel", None) is None:
        out = op(
            hidden,
            weight,
            target,
            bias=bias,
            extra_ids=list(extra_ids),
            temperature=temperature,
            vocab_bias=vocab_bias,
        )
        return out[0], out[1]
    return token_logprobs_ref(
        hidden, weight, target, extra_ids, bias=bias, temperature=temperature, vocab_bias=vocab_bias
    )


def _lm_head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states at states s_0..s_T: ``[B, T+1, H]``. The prompt (1-D) runs once."""
    decoder = model.get_decoder()
    B = tokens.shape[0]
    out = decoder(input_ids=prompt_ids[None], use_cache=True)
    h0 = out.last_hidden_state[:, -1:]  # [1, 1, H]: state s_0
    cache = expand_cache(output_cache(out), B)
    kw = cache_kwarg(model)
    h = decoder(input_ids=tokens, use_cache=True, **{kw: cache}).last_hidden_state
    return torch.cat([h0.expand(B, 1, h0.shape[-1]), h], dim=1)


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
    B, T = tokens.shape
    h = hidden_states(model, prompt_ids, tokens)  # [B, T+1, H]
    H = h.shape[-1]
    target = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # last state has no next token
    weight, bias = _lm_head(model)
    if getattr(weight, "ds_numel", None) is not None and weight.numel() == 0:
        # ZeRO-3 partitioned lm_head: call the module so DeepSpeed gathers its weight.
        logits = model.get_output_embeddings()(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        if vocab_bias is not None:
            logits = logits + vocab_bias.to(logits)
        logp = torch.log_softmax(logits, dim=-1)
        tgt = logp.gather(2, target[..., None]).squeeze(2)
        ext = logp[..., termination_token_id]
        return tgt[:, :T], ext
    tgt, ext = token_logprobs(
        h.reshape(B * (T + 1), H),
        weight,
        target.reshape(-1),
        [termination_token_id],
        bias=bias,
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
