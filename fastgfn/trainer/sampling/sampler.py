"""Batched sampling of continuations with no gradient, sharing one prompt's KV cache.

Every row of a batch continues the same prompt (or, for evaluation, each row its own prompt
of a common length, run as one batch). The prompt runs once (batch 1); its KV cache
is expanded over the batch and decoding proceeds one token per step for all rows. A row
stops when it samples the termination token; afterwards it is fed ``pad_token_id`` and its
outputs are ignored. All rows decode the same number of steps; under ``torch.distributed``
the "every row is done" flag is all-reduced so that every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively inside each forward, so a rank that
stopped early would hang the others).

The behaviour policy may differ from the policy being trained (GFlowNet losses are
off-policy): a per-row temperature, an additive vocabulary bias (``-inf`` forbids a token)
and a minimum length (termination forbidden before it).

With a tool (``fastgfn.trainer.tools``), a row whose action is one of the tool's triggers
receives the tool's result as forced tokens over the next steps (``rows.ToolFeed``): they
are part of the state, not actions. Rows then hold different numbers of actions at a step,
so the limits (``min_new_tokens``, ``max_new_tokens``) are per row, and a row is finished
only once its pending tool tokens are fed. Every running row still takes one token per
step, and the all-reduced "all done" flag keeps the ranks' decoder calls equal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastgfn.trainer.engines.distributed import all_ranks_agree
from fastgfn.trainer.sampling.decoding import as_decoder
from fastgfn.trainer.sampling.rows import Rows, ToolFeed
from fastgfn.trainer.tools import token_budget


@dataclass
class Rollout:
    """Sampled continuations of one prompt.

    ``tokens[b, t]`` is the t-th generated token of row b for ``t < lengths[b]`` and
    ``pad_token_id`` after it; the termination token itself is not stored (it is implied by
    ``terminated[b]``). ``lengths[b]`` counts generated tokens before termination; a row that
    reached ``max_new_tokens`` actions without terminating has ``terminated[b] = False``.
    With a tool, ``action_mask[b, t]`` is False at the tool's tokens (True at actions; only
    entries before ``lengths[b]`` mean anything); without one it is None (every token is an
    action).
    """

    tokens: torch.Tensor  # [B, T] long
    lengths: torch.Tensor  # [B] long
    terminated: torch.Tensor  # [B] bool
    temperatures: torch.Tensor  # [B] float
    action_mask: torch.Tensor | None = None  # [B, T] bool

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def rows(self) -> list[list[int]]:
        """The generated token ids of every row, without padding."""
        toks = self.tokens.tolist()
        return [r[:n] for r, n in zip(toks, self.lengths.tolist())]

    def masks(self) -> list[list[bool]] | None:
        """Per row, whether each of its tokens is an action (None without a tool)."""
        if self.action_mask is None:
            return None
        return [m[:n] for m, n in zip(self.action_mask.tolist(), self.lengths.tolist())]

    @property
    def num_actions(self) -> torch.Tensor:
        """``[B]``: the policy's actions per row (tool tokens not counted)."""
        if self.action_mask is None:
            return self.lengths
        inside = torch.arange(self.tokens.shape[1], device=self.lengths.device)[None] \
            < self.lengths[:, None]
        return (self.action_mask & inside).sum(1)


def draw_temperatures(
    batch_size: int,
    *,
    prob: float,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
    per_batch: bool = False,
) -> torch.Tensor:
    """Tempered exploration: with probability ``prob`` a row's temperature is drawn uniformly
    from ``[low, high]``, otherwise it is 1. ``per_batch``: one draw for the whole batch (the
    paper's scheme)."""
    device = generator.device if generator is not None else None
    n = 1 if per_batch else batch_size
    u = torch.rand(n, generator=generator, device=device)
    t = low + (high - low) * torch.rand(n, generator=generator, device=device)
    return torch.where(u < prob, t, torch.ones_like(t)).expand(batch_size).contiguous()


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None):
    """One draw per row of ``probs [B, V]`` (rows need not be normalised): inverse CDF.

    Exactly the categorical distribution up to fp32 rounding of the cumulative sum, with one
    uniform per row (``torch.multinomial`` draws V exponentials per row instead). Zero-
    probability tokens are never drawn.
    """
    cdf = probs.float().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    draw = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return draw.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def keep_in_rows(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Positions within ``rows`` (sorted) of the batch rows ``keep`` (a subset)."""
    return torch.searchsorted(rows, keep)


def _checked_temperatures(prompt_ids, batch_size, max_new_tokens, min_new_tokens,
                          temperatures, vocab_bias) -> torch.Tensor:
    """Validate ``sample``'s arguments; the per-row temperatures as ``[B]`` float32."""
    one_prompt = prompt_ids.dim() == 1 and prompt_ids.numel() > 0
    per_row = prompt_ids.dim() == 2 and prompt_ids.shape[0] == batch_size \
        and prompt_ids.shape[1] > 0
    if not (one_prompt or per_row):
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D tensor or one prompt per row [{batch_size}, P], "
            f"got {tuple(prompt_ids.shape)}"
        )
    if vocab_bias is not None and vocab_bias.dim() == 2 and vocab_bias.shape[0] != batch_size:
        raise ValueError(
            f"vocab_bias must be [V] or [{batch_size}, V], got {tuple(vocab_bias.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
    if not torch.is_tensor(temperatures):
        temperatures = torch.full((batch_size,), float(temperatures))
    temperatures = temperatures.to(device=prompt_ids.device, dtype=torch.float32)
    if temperatures.shape != (batch_size,):
        raise ValueError(
            f"temperatures must have shape ({batch_size},), got {tuple(temperatures.shape)}"
        )
    if temperatures.device.type == "cpu" and not bool((temperatures >= 0).all()):
        raise ValueError("temperatures must be >= 0 (0: greedy decoding)")
    return temperatures


def _draw(logits, temperatures, logit_bias, vocab_bias, stop_id, forbid, generator):
    """One token per row from ``softmax((logits + logit_bias) / T + vocab_bias)``, the most
    likely one where T = 0 (greedy decoding); the termination token ``stop_id`` gets
    probability 0 where ``forbid`` (True: every row; a ``[B]`` mask: those rows)."""
    z = logits.float()
    if logit_bias is not None:
        z = z + logit_bias.to(device=z.device, dtype=z.dtype)
    greedy = temperatures == 0
    z = z / torch.where(greedy, 1.0, temperatures)[:, None]
    if vocab_bias is not None:
        z = z + vocab_bias.to(device=z.device, dtype=z.dtype)  # [V] or per row [B, V]
    if forbid is True:
        z[:, stop_id] = float("-inf")
    elif forbid is not None:
        z[:, stop_id] = z[:, stop_id].masked_fill(forbid, float("-inf"))
    draw = sample_categorical(torch.softmax(z, dim=-1), generator)  # one uniform per row
    return torch.where(greedy, z.argmax(dim=-1), draw)


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    batch_size: int,
    *,
    max_new_tokens: int,
    termination_token_id: int,
    min_new_tokens: int = 0,
    temperatures: torch.Tensor | float = 1.0,
    logit_bias: torch.Tensor | None = None,
    vocab_bias: torch.Tensor | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    param_context=None,
    tool=None,
) -> Rollout:
    """Sample ``batch_size`` continuations of ``prompt_ids`` (1-D; or ``[batch_size, P]``, a
    prompt per row, all of one length, with a transformers model) from ``model`` (a
    transformers causal LM or a ``decoding.Decoder``): each token from
    ``softmax((logits + logit_bias) / temperature + vocab_bias)`` (temperature 0: greedy).
    ``logit_bias`` ([V]) is part of the policy (the paper's illegal-token bias); ``vocab_bias``
    ([V] or per row [B, V], after the temperature) restricts exploration (``-inf`` forbids a
    token).

    ``tool`` (a ``fastgfn.trainer.tools.Tool``): after a row's action is one of its triggers,
    its result tokens are fed to that row as forced tokens (state, not actions; the rollout's
    ``action_mask`` marks them). ``max_new_tokens`` and ``min_new_tokens`` count actions.

    ``param_context`` is an optional context manager entered once around the whole rollout
    (the DeepSpeed engine passes one that gathers ZeRO-3 parameters once, not per token).
    """
    B, device = batch_size, prompt_ids.device
    temperatures = _checked_temperatures(prompt_ids, B, max_new_tokens, min_new_tokens,
                                         temperatures, vocab_bias)
    width = token_budget(max_new_tokens, tool)
    feed = ToolFeed(tool, B, device) if tool is not None else None
    ctx = param_context if param_context is not None else contextlib.nullcontext()
    with ctx, as_decoder(model).decoding(prompt_ids, B, width) as decoding:
        logits = decoding.first_logits
        rows = Rows(B, width, pad_token_id, device, with_mask=tool is not None)
        cached = torch.arange(B, device=device)  # the rows the cache holds
        for t in range(width):
            forbid = rows.forbid_stop(t, min_new_tokens)
            nxt = _draw(logits, temperatures, logit_bias, vocab_bias, termination_token_id,
                        forbid, generator)
            forced = None
            if feed is not None:
                nxt, forced = feed.take(nxt)
            acted = rows.append(t, nxt, termination_token_id, forced)
            if feed is not None:
                feed.offer(rows.tokens, t, acted, nxt)
            rows.finish_full(max_new_tokens, None if feed is None else feed.pending())
            if t == width - 1 or all_ranks_agree(bool(rows.done.all())):
                break
            logits, cached = _decode_step(decoding, rows, cached, t)
    T = max(int(rows.lengths.max().item()) if B else 0, 1)
    mask = None if rows.action is None else rows.action[:, :T].contiguous()
    return Rollout(rows.tokens[:, :T].contiguous(), rows.lengths, rows.stopped.clone(),
                   temperatures, mask)


def _decode_step(decoding, rows: Rows, cached: torch.Tensor, t: int):
    """Feed step ``t``'s tokens to the rows still running (at least one, so every rank runs
    a forward); ``(next-token logits [B, V], the rows the cache now holds)``."""
    B = rows.done.shape[0]
    keep = (~rows.done).nonzero().squeeze(1)
    if keep.numel() == 0:  # other ranks still decode: run a dummy row
        keep = cached[:1]
    if keep.numel() < cached.numel():
        decoding.keep_rows(keep_in_rows(cached, keep))
        cached = keep
    step_logits = decoding.step(rows.tokens[cached, t])
    if cached.numel() == B:
        return step_logits, cached
    logits = step_logits.new_zeros(B, step_logits.shape[-1])
    logits[cached] = step_logits
    return logits, cached
