"""Per-token log-probs (DESIGN.md §2.1): from logits, or fused with the lm_head matmul.

Public functions :func:`token_logprobs` and :func:`linear_token_logprobs` return a
:class:`TokenLogProbs` of per-row fp32 results (float64 for float64 inputs): the log-prob of
the target token, the log-probs of a few extra ids (the termination token) at every row, and
optionally the row entropy and logsumexp. Neither writes an ``[N, V]`` log-softmax; the
fused-linear one never holds the ``[N, V]`` logits at all, forward or backward.

Layering (as for SubTB): the public functions validate arguments and resolve
``backend='auto'`` *before* calling the registered op ``torch.ops.fastgfn.token_logprobs`` /
``torch.ops.fastgfn.linear_token_logprobs``, whose forward and backward are registered ops
that call the reference (PyTorch), the C++ kernel or the Triton kernel. So dispatch happens
outside autograd and ``torch.compile(fullgraph=True)`` sees one opaque node. Without
gradients (``torch.no_grad()`` or inputs that do not require grad) nothing is saved.

Conventions:
* ``ignore_index`` rows get ``logp = 0`` and no gradient through ``logp``; their extra-id
  log-probs, entropy and lse are still computed (the last state of a sequence has no next
  token but does have a termination probability). Every output row is always written.
* ``vocab_bias`` is a constant (no gradient); ``-inf`` forbids a token (``p log p := 0``).
* ``softcap=c`` applies ``c * tanh(z / c)`` to the raw logits before temperature and bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastgfn._backend import resolve_backend, triton_kernels
from fastgfn._dtypes import accumulation_dtype
from fastgfn._extension import require_cpu_kernels
from fastgfn._validation import (
    as_index_tensor,
    check_float,
    check_positive_number,
    check_same_device,
    check_tensor,
    value_checks_allowed,
)
from fastgfn.reference.logprobs import (
    TokenLogProbs,
    linear_token_logprobs_backward_reference,
    token_logprobs_backward_reference,
    token_logprobs_reference,
)

__all__ = [
    "LinearTokenLogProbs",
    "TokenLogProbs",
    "TokenLogProbsLayer",
    "linear_token_logprobs",
    "token_logprobs",
]


def _softcap_or_none(softcap: float) -> float | None:
    return softcap if softcap > 0.0 else None


# ---------------------------------------------------------------------------------------------
# Backend implementations: logits -> (logp, extra, entropy, lse)
# ---------------------------------------------------------------------------------------------


def _reference_outputs(out, need_entropy, n):
    logp, extra, entropy, lse = out
    if not need_entropy:
        entropy = lse.new_empty((0,))
    return logp, extra, entropy, lse


def _fwd_reference(
    logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy
):
    out = token_logprobs_reference(
        logits,
        target,
        extra_ids,
        temperature=temperature,
        vocab_bias=vocab_bias,
        softcap=_softcap_or_none(softcap),
        ignore_index=ignore_index,
        compute_dtype=accumulation_dtype(logits),
    )
    return _reference_outputs(out, need_entropy, logits.shape[0])


def _bwd_reference(
    grad_logp,
    grad_extra,
    grad_entropy,
    grad_lse,
    logits,
    target,
    extra_ids,
    vocab_bias,
    lse,
    entropy,
    temperature,
    softcap,
    ignore_index,
):
    dlogits = token_logprobs_backward_reference(
        grad_logp,
        grad_extra,
        grad_entropy,
        grad_lse,
        logits,
        target,
        extra_ids,
        temperature=temperature,
        vocab_bias=vocab_bias,
        softcap=_softcap_or_none(softcap),
        ignore_index=ignore_index,
        compute_dtype=accumulation_dtype(logits),
    )
    return dlogits.to(logits.dtype)


def _detached(args):
    """The C++ kernels write into scratch tiles with ``out=`` ops: hand them plain tensors."""
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _fwd_cpp(
    logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy
):
    require_cpu_kernels()
    return torch.ops.fastgfn_cpu.logprobs_forward(
        *_detached([logits, target, extra_ids, vocab_bias]),
        temperature,
        softcap,
        ignore_index,
        need_entropy,
    )


def _bwd_cpp(*args):
    require_cpu_kernels()
    return torch.ops.fastgfn_cpu.logprobs_backward(*_detached(args))


def _fwd_triton(*args):
    return triton_kernels("logprobs_triton").logprobs_forward(*args)


def _bwd_triton(*args):
    return triton_kernels("logprobs_triton").logprobs_backward(*args)


_FORWARD = {"reference": _fwd_reference, "cpp": _fwd_cpp, "triton": _fwd_triton}
_BACKWARD = {"reference": _bwd_reference, "cpp": _bwd_cpp, "triton": _bwd_triton}


# ---------------------------------------------------------------------------------------------
# Backend implementations: hidden, weight -> (logp, extra, entropy, lse)
# ---------------------------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


def _lfwd_reference(
    hidden,
    weight,
    bias,
    target,
    extra_ids,
    vocab_bias,
    temperature,
    softcap,
    ignore_index,
    need_entropy,
):
    dtype = accumulation_dtype(hidden)
    return _fwd_reference(
        _linear_logits(hidden, weight, bias, dtype),
        target,
        extra_ids,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        need_entropy,
    )


def _lbwd_reference(
    grad_logp,
    grad_extra,
    grad_entropy,
    grad_lse,
    hidden,
    weight,
    bias,
    target,
    extra_ids,
    vocab_bias,
    lse,
    entropy,
    temperature,
    softcap,
    ignore_index,
    need_hidden,
    need_weight,
    need_bias,
):
    dh, dw, db = linear_token_logprobs_backward_reference(
        grad_logp,
        grad_extra,
        grad_entropy,
        grad_lse,
        hidden,
        weight,
        target,
        bias,
        extra_ids,
        temperature=temperature,
        vocab_bias=vocab_bias,
        softcap=_softcap_or_none(softcap),
        ignore_index=ignore_index,
        compute_dtype=accumulation_dtype(hidden),
    )

    def empty():
        return hidden.new_empty((0,))

    return (
        dh.to(hidden.dtype) if need_hidden else empty(),
        dw.to(weight.dtype) if need_weight else empty(),
        db.to(bias.dtype) if (need_bias and db is not None) else empty(),
    )


def _lfwd_cpp(*args):
    require_cpu_kernels()
    return torch.ops.fastgfn_cpu.linear_logprobs_forward(*_detached(args))


def _lbwd_cpp(*args):
    require_cpu_kernels()
    return torch.ops.fastgfn_cpu.linear_logprobs_backward(*_detached(args))


def _lfwd_triton(*args):
    return triton_kernels("linear_logprobs_triton").linear_logprobs_forward(*args)


def _lbwd_triton(*args):
    return triton_kernels("linear_logprobs_triton").linear_logprobs_backward(*args)


_LFORWARD = {"reference": _lfwd_reference, "cpp": _lfwd_cpp, "triton": _lfwd_triton}
_LBACKWARD = {"reference": _lbwd_reference, "cpp": _lbwd_cpp, "triton": _lbwd_triton}


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------


def _fake_outputs(x, n, k, need_entropy):
    dtype = accumulation_dtype(x)
    return (
        x.new_empty((n,), dtype=dtype),
        x.new_empty((n, k), dtype=dtype),
        x.new_empty((n if need_entropy else 0,), dtype=dtype),
        x.new_empty((n,), dtype=dtype),
    )


@torch.library.custom_op("fastgfn::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    extra_ids: torch.Tensor,
    vocab_bias: torch.Tensor | None,
    temperature: float,
    softcap: float,
    ignore_index: int,
    need_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], extra [N, K], entropy [N] or [0], lse [N]); ``backend`` already resolved."""
    out = _FORWARD[backend](
        logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy
    )
    return tuple(o.contiguous() for o in out)


@token_logprobs_op.register_fake
def _(
    logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy, backend
):
    return _fake_outputs(logits, logits.shape[0], extra_ids.shape[0], need_entropy)


@torch.library.custom_op("fastgfn::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_extra: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    extra_ids: torch.Tensor,
    vocab_bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """d logits for upstream gradients on every output."""
    return _BACKWARD[backend](
        grad_logp,
        grad_extra,
        grad_entropy,
        grad_lse,
        logits,
        target,
        extra_ids,
        vocab_bias,
        lse,
        entropy,
        temperature,
        softcap,
        ignore_index,
    ).contiguous()


@token_logprobs_backward_op.register_fake
def _(grad_logp, grad_extra, grad_entropy, grad_lse, logits, *rest):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    (
        logits,
        target,
        extra_ids,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        need_entropy,
        backend,
    ) = inputs
    _, _, entropy, lse = output
    ctx.save_for_backward(logits, target, extra_ids, vocab_bias, lse, entropy)
    ctx.args = (temperature, softcap, ignore_index, need_entropy, backend)


def _backward(ctx, g_logp, g_extra, g_entropy, g_lse):
    logits, target, extra_ids, vocab_bias, lse, entropy = ctx.saved_tensors
    temperature, softcap, ignore_index, need_entropy, backend = ctx.args
    dlogits = None
    if ctx.needs_input_grad[0]:
        dlogits = token_logprobs_backward_op(
            g_logp,
            g_extra,
            g_entropy if need_entropy else None,
            g_lse,
            logits,
            target,
            extra_ids,
            vocab_bias,
            lse,
            entropy,
            temperature,
            softcap,
            ignore_index,
            backend,
        )
    return dlogits, None, None, None, None, None, None, None, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastgfn::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    extra_ids: torch.Tensor,
    vocab_bias: torch.Tensor | None,
    temperature: float,
    softcap: float,
    ignore_index: int,
    need_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``token_logprobs`` with ``logits = hidden @ weight.T + bias`` never materialised."""
    out = _LFORWARD[backend](
        hidden,
        weight,
        bias,
        target,
        extra_ids,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        need_entropy,
    )
    return tuple(o.contiguous() for o in out)


@linear_token_logprobs_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    extra_ids,
    vocab_bias,
    temperature,
    softcap,
    ignore_index,
    need_entropy,
    backend,
):
    return _fake_outputs(hidden, hidden.shape[0], extra_ids.shape[0], need_entropy)


@torch.library.custom_op("fastgfn::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_extra: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_lse: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    extra_ids: torch.Tensor,
    vocab_bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias); a gradient not asked for is an empty tensor."""
    out = _LBACKWARD[backend](
        grad_logp,
        grad_extra,
        grad_entropy,
        grad_lse,
        hidden,
        weight,
        bias,
        target,
        extra_ids,
        vocab_bias,
        lse,
        entropy,
        temperature,
        softcap,
        ignore_index,
        need_hidden,
        need_weight,
        need_bias,
    )
    return tuple(o.contiguous() for o in out)


@linear_token_logprobs_backward_op.register_fake
def _(
    grad_logp,
    grad_extra,
    grad_entropy,
    grad_lse,
    hidden,
    weight,
    bias,
    target,
    extra_ids,
    vocab_bias,
    lse,
    entropy,
    temperature,
    softcap,
    ignore_index,
    need_hidden,
    need_weight,
    need_bias,
    backend,
):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,)),
        torch.empty_like(weight) if need_weight else hidden.new_empty((0,)),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty((0,)),
    )


def _linear_setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        target,
        extra_ids,
        vocab_bias,
        temperature,
        softcap,
        ignore_index,
        need_entropy,
        backend,
    ) = inputs
    _, _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy)
    ctx.args = (temperature, softcap, ignore_index, need_entropy, backend)


def _linear_backward(ctx, g_logp, g_extra, g_entropy, g_lse):
    hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy = ctx.saved_tensors
    temperature, softcap, ignore_index, need_entropy, backend = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    if not (need_h or need_w or need_b):
        return (None,) * 11
    dh, dw, db = linear_token_logprobs_backward_op(
        g_logp,
        g_extra,
        g_entropy if need_entropy else None,
        g_lse,
        hidden,
        weight,
        bias,
        target,
        extra_ids,
        vocab_bias,
        lse,
        entropy,
        temperature,
        softcap,
        ignore_index,
        need_h,
        need_w,
        need_b,
        backend,
    )
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, *(None,) * 8)


linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


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
    with ``z' = softcap(logits) / temperature + vocab_bias`` (DESIGN.md §2.1), fp32 (float64
    for float64 logits). Differentiable w.r.t. ``logits`` for upstream gradients on every
    output.
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
    floating dtype. Outputs as :func:`token_logprobs`. Gradients flow to hidden, weight and
    bias; the weight gradient is accumulated in fp32 whatever the input dtype.
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
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    V = weight.shape[0]
    if bias is not None:
        bias = check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
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


class TokenLogProbsLayer(nn.Module):
    """``nn.Module`` form of :func:`token_logprobs` with fixed options."""

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

    def forward(self, logits, target):
        return token_logprobs(logits, target, self.extra_ids, vocab_bias=self.vocab_bias, **self.kw)


class LinearTokenLogProbs(nn.Module):
    """``nn.Module`` form of :func:`linear_token_logprobs` with fixed options.

    ``forward(hidden, weight, target, bias=None)``: the lm_head is passed in (it usually
    belongs to the model), so the same module serves tied embeddings.
    """

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

    def forward(self, hidden, weight, target, bias=None):
        return linear_token_logprobs(
            hidden, weight, target, bias, self.extra_ids, vocab_bias=self.vocab_bias, **self.kw
        )
