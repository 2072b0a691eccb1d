"""Per-token log-probs (docs/MATH.md §1): from logits, or fused with the lm_head matmul.

Public functions :func:`token_logprobs` and :func:`linear_token_logprobs` return a
:class:`TokenLogProbs` of per-row fp32 results (float64 for float64 inputs): the log-prob of
the target token, the log-probs of a few extra ids (the termination token) at every row, and
optionally the row entropy and logsumexp. Neither writes an ``[N, V]`` log-softmax; the
fused-linear one never holds the ``[N, V]`` logits at all, forward or backward.

Layering (as for SubTB): these functions validate arguments and resolve ``backend='auto'``
(:func:`fastgfn.backends.resolve_backend`) *before* calling the registered ops of
:mod:`fastgfn.ops.logprobs_ops`, so dispatch happens outside autograd and
``torch.compile(fullgraph=True)`` sees one opaque node.

Conventions:
* ``ignore_index`` rows get ``logp = 0`` and no gradient through ``logp``; their extra-id
  log-probs, entropy and lse are still computed (the last state of a sequence has no next
  token but does have a termination probability). Every output row is always written.
* ``vocab_bias`` is a constant (no gradient); ``-inf`` forbids a token (``p log p := 0``).
* ``softcap=c`` applies ``c * tanh(z / c)`` to the raw logits before temperature and bias.
* Ids out of range (a target other than ``ignore_index`` outside ``[0, V)``, or such an extra
  id) raise ``ValueError`` when values may be read (CPU tensors; accelerator tensors in debug
  mode). Where they are not checked (accelerators without debug mode, ``torch.compile``),
  every backend returns NaN for the outputs that name them, with no gradient through those
  NaN values; the other outputs are unaffected (docs/MATH.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastgfn._validation import (
    as_index_tensor,
    check_float,
    check_positive_number,
    check_same_device,
    check_tensor,
    value_checks_allowed,
)
from fastgfn.backends import resolve_backend
from fastgfn.ops.logprobs_ops import linear_token_logprobs_op, token_logprobs_op
from fastgfn.reference.logprobs import TokenLogProbs

__all__ = [
    "LinearTokenLogProbs",
    "TokenLogProbs",
    "TokenLogProbsLayer",
    "linear_token_logprobs",
    "token_logprobs",
]


def _check_options(temperature, softcap, ignore_index) -> tuple[float, float]:
    temperature = check_positive_number("temperature", temperature)
    softcap = 0.0 if softcap is None else check_positive_number("softcap", softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return temperature, softcap


def _check_targets(target, lead_shape, V, ignore_index, extra_ids, device):
    target = check_tensor("target", target)
    target = as_index_tensor("target", target, device)
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"target must have shape {tuple(lead_shape)} (the leading dims of the input), "
            f"got {tuple(target.shape)}"
        )
    if extra_ids is None:
        extra = torch.zeros(0, dtype=torch.long, device=device)
    elif isinstance(extra_ids, int) and not isinstance(extra_ids, bool):
        extra = torch.tensor([extra_ids], dtype=torch.long, device=device)
    else:
        extra = as_index_tensor("extra_ids", extra_ids, device)
        if extra.dim() != 1:
            raise ValueError(f"extra_ids must be 1-D, got shape {tuple(extra.shape)}")
    check_same_device("target", target, extra_ids=extra)
    if value_checks_allowed(target) and target.numel() > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            value = int(target[bad].flatten()[0])
            raise ValueError(
                f"target values must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                f"got {value}"
            )
    if (
        value_checks_allowed(extra)
        and extra.numel() > 0
        and bool(((extra < 0) | (extra >= V)).any())
    ):
        raise ValueError(f"extra_ids must lie in [0, {V}), got {extra.tolist()}")
    return target.reshape(-1), extra.reshape(-1)


def _check_vocab_bias(vocab_bias, V, ref_name, ref):
    if vocab_bias is None:
        return None
    vocab_bias = check_tensor("vocab_bias", vocab_bias, ndim=1)
    check_float("vocab_bias", vocab_bias)
    if vocab_bias.shape[0] != V:
        raise ValueError(f"vocab_bias must have shape ({V},), got {tuple(vocab_bias.shape)}")
    check_same_device(ref_name, ref, vocab_bias=vocab_bias)
    return vocab_bias.detach()


def _package(out, lead_shape, return_entropy, return_lse) -> TokenLogProbs:
    logp, extra, entropy, lse = out
    k = extra.shape[-1]
    return TokenLogProbs(
        logp.reshape(lead_shape),
        extra.reshape(*lead_shape, k),
        entropy.reshape(lead_shape) if return_entropy else None,
        lse.reshape(lead_shape) if return_lse else None,
    )


def token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    extra_ids: torch.Tensor | Sequence[int] | int | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> TokenLogProbs:
    """Per-token log-probs from ``logits [..., V]`` in one pass over the vocabulary.

    Returns ``TokenLogProbs(logp [...], extra [..., K], entropy [...] | None, lse [...] | None)``
    with ``z' = softcap(logits) / temperature + vocab_bias`` (docs/MATH.md §1), fp32 (float64
    for float64 logits). Differentiable w.r.t. ``logits`` for upstream gradients on every
    output. ``target`` must be in ``[0, V)`` or ``ignore_index`` and ``extra_ids`` in
    ``[0, V)``: checked when values may be read, NaN outputs otherwise (module docstring).
    """
    logits = check_tensor("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got {tuple(logits.shape)}")
    check_float("logits", logits)
    temperature, softcap = _check_options(temperature, softcap, ignore_index)
    V = logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    target, extra = _check_targets(target, lead, V, ignore_index, extra_ids, logits.device)
    check_same_device("logits", logits, target=target)
    vocab_bias = _check_vocab_bias(vocab_bias, V, "logits", logits)
    impl = resolve_backend(backend, logits.device)
    out = token_logprobs_op(
        logits.reshape(-1, V),
        target,
        extra,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        impl,
    )
    return _package(out, lead, return_entropy, return_lse)


def _master_weights(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 weights with half-precision hidden states: the mixed-precision pairing."""
    return weight.dtype == torch.float32 and hidden.dtype in (torch.bfloat16, torch.float16)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    extra_ids: torch.Tensor | Sequence[int] | int | None = None,
    *,
    temperature: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> TokenLogProbs:
    """Per-token log-probs of ``logits = hidden @ weight.T + bias`` without forming them.

    ``hidden [..., H]``, ``weight [V, H]`` (an lm_head), ``bias [V]`` or None, all of one
    floating dtype, or bf16/fp16 ``hidden`` with fp32 ``weight`` and ``bias`` (mixed
    precision: fp32 master weights, the products in hidden's dtype with fp32 accumulation, as
    ``F.linear`` under autocast). Outputs as :func:`token_logprobs`. Gradients flow to hidden,
    weight and bias, each in its own dtype; the weight gradient is accumulated in fp32
    whatever the input dtype. Ids out of range: as :func:`token_logprobs`.
    """
    hidden = check_tensor("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H] with at least 2 dims, got {tuple(hidden.shape)}")
    check_float("hidden", hidden)
    weight = check_tensor("weight", weight, ndim=2)
    check_float("weight", weight)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"weight must have shape (V, {H}) to match hidden [..., {H}], got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype and not _master_weights(hidden, weight):
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} (weights of "
            "another dtype than hidden: only float32 weights with bfloat16/float16 hidden)"
        )
    V = weight.shape[0]
    if bias is not None:
        bias = check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    check_same_device("hidden", hidden, weight=weight, bias=bias)
    temperature, softcap = _check_options(temperature, softcap, ignore_index)
    lead = tuple(hidden.shape[:-1])
    target, extra = _check_targets(target, lead, V, ignore_index, extra_ids, hidden.device)
    check_same_device("hidden", hidden, target=target)
    vocab_bias = _check_vocab_bias(vocab_bias, V, "hidden", hidden)
    impl = resolve_backend(backend, hidden.device)
    out = linear_token_logprobs_op(
        hidden.reshape(-1, H),
        weight,
        bias,
        target,
        extra,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        impl,
    )
    return _package(out, lead, return_entropy, return_lse)


class _LogProbsModule(nn.Module):
    def __init__(
        self,
        extra_ids=None,
        *,
        temperature=1.0,
        vocab_bias=None,
        softcap=None,
        ignore_index=-100,
        return_entropy=False,
        return_lse=False,
        backend="auto",
    ):
        super().__init__()
        _check_options(temperature, softcap, ignore_index)
        self.extra_ids = extra_ids
        self.register_buffer("vocab_bias", vocab_bias, persistent=False)
        self.kw = dict(
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            return_lse=return_lse,
            backend=backend,
        )


class TokenLogProbsLayer(_LogProbsModule):
    """``nn.Module`` form of :func:`token_logprobs` with fixed options."""

    def forward(self, logits, target):
        return token_logprobs(logits, target, self.extra_ids, vocab_bias=self.vocab_bias, **self.kw)


class LinearTokenLogProbs(_LogProbsModule):
    """``nn.Module`` form of :func:`linear_token_logprobs` with fixed options.

    ``forward(hidden, weight, target, bias=None)``: the lm_head is passed in (it usually
    belongs to the model), so the same module serves tied embeddings.
    """

    def forward(self, hidden, weight, target, bias=None):
        return linear_token_logprobs(
            hidden, weight, target, bias, self.extra_ids, vocab_bias=self.vocab_bias, **self.kw
        )
