"""Per-position log-probs of sampled continuations: one teacher-forced pass per model.

For a prompt X shared by all rows and generated tokens z_1..z_T, the states are the prefixes
s_t = X z_1..z_t. One pass of the decoder over the prompt (batch 1, its KV cache expanded over
the batch, so the gradient through the shared prefix accumulates once) and one over the
generated tokens give the final hidden state at every state s_0..s_T; the library's
``fastgfn.lm_logprobs.gfn_logprobs_from_hidden`` turns them into

    log_pf[b, t]    = log q(z_{t+1} | s_t)   t = 0..T-1
    log_pterm[b, t] = log q(STOP    | s_t)   t = 0..T

through the model's own output layer (docs/MATH.md §4). The same pass of a frozen reward LM
gives the reward of every prefix, ``log p(z_1..z_t STOP | X)`` (``prefix_log_likelihoods``).
"""

from __future__ import annotations

import torch

from fastgfn.lm_logprobs import gfn_logprobs_from_hidden
from fastgfn.trainer.kv_cache import cache_kwarg, expand_cache, output_cache


def hidden_states(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, *,
                  return_cache: bool = False):
    """Final hidden states at states s_0..s_T: ``[B, T+1, H]``. The prompt (1-D) runs once.
    With ``return_cache``: ``(hidden, cache)``, the KV cache of prompt + tokens per row."""
    decoder = model.get_decoder()
    B = tokens.shape[0]
    out = decoder(input_ids=prompt_ids[None], use_cache=True)
    h0 = out.last_hidden_state[:, -1:]  # [1, 1, H]: state s_0
    cache = expand_cache(output_cache(out), B)
    out = decoder(input_ids=tokens, use_cache=True, **{cache_kwarg(model): cache})
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
    h = hidden_states(model, prompt_ids, tokens)
    return gfn_logprobs_from_hidden(model, h, tokens, termination_token_id,
                                    temperature=temperature, vocab_bias=vocab_bias,
                                    fused=use_fused)


def prefix_log_likelihoods(log_pf: torch.Tensor, log_pterm: torch.Tensor) -> torch.Tensor:
    """``log p(z_1..z_t STOP | X)`` for t = 0..T (``[B, T+1]``): the cumulative token
    log-probs plus the termination log-prob at each state."""
    cum = torch.cat([log_pf.new_zeros(log_pf.shape[0], 1), log_pf.cumsum(1)], dim=1)
    return cum + log_pterm


@torch.no_grad()
def frozen_prefix_logrewards(model, prompt_ids, tokens, termination_token_id, *,
                             temperature: float = 1.0, use_fused: bool = True):
    """Reward of every prefix under a frozen LM: ``log p(s_t STOP | X)`` for t = 0..T."""
    log_pf, log_pterm = gfn_logprobs(model, prompt_ids, tokens, termination_token_id,
                                     temperature=temperature, use_fused=use_fused)
    return prefix_log_likelihoods(log_pf, log_pterm)
