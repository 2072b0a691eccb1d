"""Batched sampling of continuations with no gradient, sharing one prompt's KV cache.

Every row of a batch continues the same prompt. The prompt runs once (batch 1); its KV cache
is expanded over the batch and decoding proceeds one token per step for all rows. A row
stops when it samples the termination token; afterwards it is fed ``pad_token_id`` and its
outputs are ignored. All rows decode the same number of steps; under ``torch.distributed``
the "every row is done" flag is all-reduced so that every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively inside each forward, so a rank that
stopped early would hang the others).

The behaviour policy may differ from the policy being trained (GFlowNet losses are
off-policy): a per-row temperature, an additive vocabulary bias (``-inf`` forbids a token)
and a minimum length (termination forbidden before it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastgfn.trainer.engines.distributed import all_ranks_agree
from fastgfn.trainer.sampling.decoding import as_decoder


@dataclass
class Rollout:
    """Sampled continuations of one prompt.

    ``tokens[b, t]`` is the t-th generated token of row b for ``t < lengths[b]`` and
    ``pad_token_id`` after it; the termination token itself is not stored (it is implied by
    ``terminated[b]``). ``lengths[b]`` counts generated tokens before termination; a row that
    reached ``max_new_tokens`` without terminating has ``terminated[b] = False``.
    """

    tokens: torch.Tensor  # [B, T] long
    lengths: torch.Tensor  # [B] long
    terminated: torch.Tensor  # [B] bool
    temperatures: torch.Tensor  # [B] float

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def rows(self) -> list[list[int]]:
        """The generated token ids of every row, without padding."""
        toks = self.tokens.tolist()
        return [r[:n] for r, n in zip(toks, self.lengths.tolist())]


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
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D tensor, got {tuple(prompt_ids.shape)}"
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


def _draw(logits, temperatures, logit_bias, vocab_bias, forbid_id, generator):
    """One token per row from ``softmax((logits + logit_bias) / T + vocab_bias)``, the most
    likely one where T = 0 (greedy decoding); ``forbid_id`` (termination before the minimum
    length) gets probability 0 when given."""
    z = logits.float()
    if logit_bias is not None:
        z = z + logit_bias.to(device=z.device, dtype=z.dtype)
    greedy = temperatures == 0
    z = z / torch.where(greedy, 1.0, temperatures)[:, None]
    if vocab_bias is not None:
        z = z + vocab_bias.to(device=z.device, dtype=z.dtype)  # [V] or per row [B, V]
    if forbid_id is not None:
        z = z.clone()
        z[:, forbid_id] = float("-inf")
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
) -> Rollout:
    """Sample ``batch_size`` continuations of ``prompt_ids`` (1-D) from ``model`` (a
    transformers causal LM or a ``decoding.Decoder``): each token from
    ``softmax((logits + logit_bias) / temperature + vocab_bias)`` (temperature 0: greedy).
    ``logit_bias`` ([V]) is part of the policy (the paper's illegal-token bias); ``vocab_bias``
    ([V] or per row [B, V], after the temperature) restricts exploration (``-inf`` forbids a
    token).

    ``param_context`` is an optional context manager entered once around the whole rollout
    (the DeepSpeed engine passes one that gathers ZeRO-3 parameters once, not per token).
    """
    B, device = batch_size, prompt_ids.device
    temperatures = _checked_temperatures(prompt_ids, B, max_new_tokens, min_new_tokens,
                                         temperatures, vocab_bias)
    ctx = param_context if param_context is not None else contextlib.nullcontext()
    with ctx, as_decoder(model).decoding(prompt_ids, B, max_new_tokens) as decoding:
        logits = decoding.first_logits
        tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # the rows the cache holds
        for t in range(max_new_tokens):
            forbid = termination_token_id if t < min_new_tokens else None
            nxt = _draw(logits, temperatures, logit_bias, vocab_bias, forbid, generator)
            stop = (nxt == termination_token_id) & ~done
            keep = ~done & ~stop
            tokens[:, t] = torch.where(keep, nxt, torch.full_like(nxt, pad_token_id))
            lengths += keep.long()
            done |= stop
            if t == max_new_tokens - 1 or all_ranks_agree(bool(done.all())):
                break
            # Decode only the rows still running (at least one, so every rank runs a forward).
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:  # other ranks still decode: run a dummy row
                keep = rows[:1]
            if keep.numel() < rows.numel():
                decoding.keep_rows(keep_in_rows(rows, keep))
                rows = keep
            step_logits = decoding.step(tokens[rows, t])
            if rows.numel() == B:
                logits = step_logits
            else:
                logits = step_logits.new_zeros(B, step_logits.shape[-1])
                logits[rows] = step_logits
    T = int(lengths.max().item()) if B else 0
    return Rollout(tokens[:, : max(T, 1)].contiguous(), lengths, done.clone(), temperatures)
