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

With a tool, the generated tokens mix actions and tool tokens (``action_mask``), and the
states are s_t = X followed by the first t actions and their tool results. The pass still
runs once over every token; ``state_positions`` says where each state's hidden state is
(after how many tokens), and ``gfn_logprobs(..., states=...)`` gathers the hidden states
there before the output layer, so ``log_pf`` exists only for actions (the action taken at
s_t is the token at that position) and ``log_pterm`` at every state; a tool token's
log-prob is never computed.
"""

from __future__ import annotations

import torch

from fastgfn.lm_logprobs import gfn_logprobs_from_hidden
from fastgfn.trainer.model.cpu_attention import teacher_forced_attention
from fastgfn.trainer.model.kv_cache import cache_kwarg, expand_cache, output_cache
from fastgfn.trainer.model.lean_modules import lean_teacher_forced_layers


def hidden_states(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, *,
                  return_cache: bool = False):
    """Final hidden states at states s_0..s_T: ``[B, T+1, H]``. The prompt (1-D) runs once.
    With ``return_cache``: ``(hidden, cache)``, the KV cache of prompt + tokens per row."""
    decoder = model.get_decoder()
    B, T = tokens.shape
    P = prompt_ids.shape[0]
    with lean_teacher_forced_layers(model):  # keeps less for the backward, same values
        with teacher_forced_attention(model, 1, P, P):
            out = decoder(input_ids=prompt_ids[None], use_cache=True)
        h0 = out.last_hidden_state[:, -1:]  # [1, 1, H]: state s_0
        cache = expand_cache(output_cache(out), B)
        with teacher_forced_attention(model, B, T, P + T):
            out = decoder(input_ids=tokens, use_cache=True, **{cache_kwarg(model): cache})
    h = torch.cat([h0.expand(B, 1, h0.shape[-1]), out.last_hidden_state], dim=1)
    return (h, output_cache(out)) if return_cache else h


def state_positions(action_mask: torch.Tensor, lengths: torch.Tensor):
    """``(states [B, S+1], num_actions [B])`` of rows of actions and tool tokens:
    ``states[b, t]`` is the number of tokens before row b's (t+1)-th action, i.e. where its
    state s_t is, for t < num_actions[b], and ``lengths[b]`` for t >= num_actions[b] (the
    final state, repeated as padding). ``action_mask [B, W]`` is True at actions; entries at
    or past a row's length are ignored. ``S`` is the largest number of actions."""
    B, W = action_mask.shape
    lengths = lengths.to(action_mask.device)
    valid = action_mask.bool() & (torch.arange(W, device=action_mask.device)[None]
                                  < lengths[:, None])
    num_actions = valid.sum(1)
    S = int(num_actions.max()) if B else 0
    states = lengths[:, None].expand(B, S + 1).clone()
    rank = valid.long().cumsum(1) - 1  # each action's index among its row's actions
    b_idx, pos = valid.nonzero(as_tuple=True)
    states[b_idx, rank[b_idx, pos]] = pos
    return states, num_actions


def gfn_logprobs(
    model,
    prompt_ids: torch.Tensor,
    tokens: torch.Tensor,
    termination_token_id: int,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    use_fused: bool = True,
    states: torch.Tensor | None = None,
):
    """``(log_pf [B, T], log_pterm [B, T+1])`` of ``tokens [B, T]`` continuing ``prompt_ids``.
    With ``states`` (``[B, S+1]`` from ``state_positions``; rows with tool tokens):
    ``(log_pf [B, S], log_pterm [B, S+1])`` over the actions and the states only.

    Entries past a row's length (its number of actions) are computed on padding and must be
    masked by the loss.
    """
    h = hidden_states(model, prompt_ids, tokens)
    if states is not None:
        states = states.to(h.device)
        h = h.gather(1, states[..., None].expand(-1, -1, h.shape[-1]))  # [B, S+1, H]
        tokens = tokens.gather(1, states[:, :-1].clamp(max=tokens.shape[1] - 1))
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
