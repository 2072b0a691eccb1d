"""Pure-PyTorch reference for the per-token log-prob ops (docs/MATH.md §1).

Readable and exact: it materialises the ``[N, V]`` log-softmax, computes in ``compute_dtype``
(float64 by default, which is what the tests compare every backend against) and gets its
gradients from autograd. It is also the ``backend="reference"`` fallback of
:func:`fastgfn.token_logprobs` / :func:`fastgfn.linear_token_logprobs` (run there in fp32).

    z        = h W^T + b                      (linear variant only)
    z        = c tanh(z / c)                  (softcap c, optional)
    z'       = z / tau + beta                 (temperature tau, vocabulary bias beta)
    lse      = logsumexp_v z'
    logp     = z'[y] - lse                    (0 where y == ignore_index, NaN for y not in [0, V))
    extra_k  = z'[e_k] - lse                  (every row, ignored or not; NaN for e_k not in [0, V))
    entropy  = -sum_v p log p                 (p log p := 0 where p == 0, e.g. beta = -inf)
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenLogProbs(NamedTuple):
    """Per-row outputs (fp32, float64 for float64 inputs).

    logp: ``[N]`` log-prob of the target (0 on ``ignore_index`` rows); extra: ``[N, K]``
    log-probs of the extra ids (e.g. the termination token); entropy / lse: ``[N]`` or None.
    """

    logp: torch.Tensor
    extra: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


def transform_logits(
    z: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``z -> c tanh(z / c) / tau + beta`` in the dtype of ``z``."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if vocab_bias is not None:
        z = z + vocab_bias.to(z.dtype)
    return z


def checked_targets(target: torch.Tensor, ignore_index: int, V: int):
    """(valid, bad, safe): rows whose target is a vocabulary id, rows whose target is neither
    that nor ``ignore_index`` (their log-prob is NaN, docs/MATH.md §1), and the targets with
    every other row pointed at column 0, as int64."""
    in_range = (target >= 0) & (target < V)
    valid = in_range & (target != ignore_index)
    bad = ~in_range & (target != ignore_index)
    return valid, bad, torch.where(valid, target, torch.zeros_like(target)).long()


def checked_extra_ids(extra_ids: torch.Tensor | None, V: int, device):
    """(ok [K], safe [K] int64): which extra ids are vocabulary ids (the others give NaN
    columns), and the ids with the others pointed at column 0."""
    if extra_ids is None:
        extra_ids = torch.zeros(0, dtype=torch.long, device=device)
    ok = (extra_ids >= 0) & (extra_ids < V)
    return ok, torch.where(ok, extra_ids, torch.zeros_like(extra_ids)).long()


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in ``dtype``."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def token_logprobs_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    extra_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> TokenLogProbs:
    """Log-probs of ``target`` and ``extra_ids`` from ``logits [N, V]``, plus entropy and lse."""
    z = transform_logits(
        logits.to(compute_dtype), temperature=temperature, vocab_bias=vocab_bias, softcap=softcap
    )
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z - lse[:, None]
    V = z.shape[-1]
    valid, bad, safe_target = checked_targets(target, ignore_index, V)
    logp = logprobs.gather(1, safe_target[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.where(bad, torch.nan, torch.zeros_like(logp)))
    ok, safe_extra = checked_extra_ids(extra_ids, V, logits.device)
    extra = torch.where(ok, logprobs[:, safe_extra], torch.nan)
    p = logprobs.exp()
    # p log p is 0 where p underflows (or the bias is -inf); mask before multiplying so that
    # neither the value nor its gradient sees 0 * -inf.
    entropy = -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)
    return TokenLogProbs(logp, extra, entropy, lse)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> TokenLogProbs:
    """Same outputs with ``logits = hidden @ weight.T + bias`` formed explicitly."""
    return token_logprobs_reference(
        linear_logits(hidden, weight, bias, compute_dtype),
        target,
        extra_ids,
        temperature=temperature,
        vocab_bias=vocab_bias,
        softcap=softcap,
        ignore_index=ignore_index,
        compute_dtype=compute_dtype,
    )


def token_logprobs_backward_reference(
    grad_logp: torch.Tensor | None,
    grad_extra: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    logits: torch.Tensor,
    target: torch.Tensor,
    extra_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """d logits, written out (docs/MATH.md §1), for upstream gradients on every output (None = 0):

    dz' = g_y (1[v=y] - p) + sum_k g_e,k (1[v=e_k] - p) - g_H p (log p + H) + g_lse p
    dz  = dz' / tau * (1 - tanh^2(z / c))        (the last factor only with a softcap)
    """
    z = logits.to(compute_dtype)
    zt = transform_logits(z, temperature=temperature, vocab_bias=vocab_bias, softcap=softcap)
    N, V = zt.shape
    lse = torch.logsumexp(zt, dim=-1, keepdim=True)
    logprobs = zt - lse
    p = logprobs.exp()
    dzt = torch.zeros_like(zt)
    zero = torch.zeros((), dtype=compute_dtype)
    valid, _, safe = checked_targets(target, ignore_index, V)
    if grad_logp is not None:  # out-of-range ids give constant NaN outputs: no gradient
        g = torch.where(valid, grad_logp.to(compute_dtype), zero)
        dzt.scatter_add_(1, safe[:, None], g[:, None])
        dzt -= g[:, None] * p
    if grad_extra is not None and extra_ids is not None and extra_ids.numel() > 0:
        ok, safe_extra = checked_extra_ids(extra_ids, V, logits.device)
        ge = torch.where(ok, grad_extra.to(compute_dtype), zero)
        dzt.scatter_add_(1, safe_extra[None, :].expand(N, -1), ge)
        dzt -= ge.sum(1, keepdim=True) * p
    if grad_entropy is not None:
        entropy = -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1, keepdim=True)
        dzt -= grad_entropy.to(compute_dtype)[:, None] * torch.where(
            p > 0, p * (logprobs + entropy), torch.zeros((), dtype=compute_dtype)
        )
    if grad_lse is not None:
        dzt += grad_lse.to(compute_dtype)[:, None] * p
    dz = dzt / temperature
    if softcap is not None:
        dz = dz * (1 - torch.tanh(z / softcap) ** 2)
    return dz


def linear_token_logprobs_backward_reference(
    grad_logp,
    grad_extra,
    grad_entropy,
    grad_lse,
    hidden,
    weight,
    target,
    bias=None,
    extra_ids=None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d hidden, d weight, d bias) = (dz W, dz^T h, sum_n dz) with dz from the logits rule."""
    h = hidden.to(compute_dtype)
    w = weight.to(compute_dtype)
    dz = token_logprobs_backward_reference(
        grad_logp,
        grad_extra,
        grad_entropy,
        grad_lse,
        linear_logits(h, w, bias, compute_dtype),
        target,
        extra_ids,
        compute_dtype=compute_dtype,
        **options,
    )
    return dz @ w, dz.T @ h, (dz.sum(0) if bias is not None else None)
