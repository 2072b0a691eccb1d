"""The registered per-token log-prob ops: schema, fake tensors, autograd, backend dispatch.

``torch.ops.fastgfn.token_logprobs`` / ``linear_token_logprobs`` and their ``_backward`` ops
take flat schema arguments (tensors, floats, ints, bools, the resolved backend name). Each
op body builds the call's :class:`~fastgfn.backends.LogProbOptions` and hands it, with the
tensors, to the backend module (:func:`fastgfn.backends.get_backend`). The public functions
in :mod:`fastgfn.ops.logprobs` validate arguments and resolve ``backend="auto"`` before calling
these ops, so ``torch.compile(fullgraph=True)`` sees one opaque node per op. Without
gradients (``torch.no_grad()`` or inputs that do not require grad) nothing is saved.
"""

from __future__ import annotations

import torch

from fastgfn._dtypes import accumulation_dtype
from fastgfn.backends import GradsNeeded, LogProbOptions, OutputGrads, get_backend

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _contiguous(out):
    return tuple(o.contiguous() for o in out)


def _fake_outputs(x, k, need_entropy):
    n, dtype = x.shape[0], accumulation_dtype(x)
    return (
        x.new_empty((n,), dtype=dtype),
        x.new_empty((n, k), dtype=dtype),
        x.new_empty((n if need_entropy else 0,), dtype=dtype),
        x.new_empty((n,), dtype=dtype),
    )


def _grads(g_logp, g_extra, g_entropy, g_lse, opts):
    return OutputGrads(g_logp, g_extra, g_entropy if opts.need_entropy else None, g_lse)


# ---------------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------------


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
) -> Outputs:
    """(logp [N], extra [N, K], entropy [N] or [0], lse [N]); ``backend`` already resolved."""
    opts = LogProbOptions(temperature, softcap, ignore_index, need_entropy)
    out = get_backend(backend).logprobs_forward(logits, target, extra_ids, vocab_bias, opts)
    return _contiguous(out)


@token_logprobs_op.register_fake
def _(logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy,
      backend):
    return _fake_outputs(logits, extra_ids.shape[0], need_entropy)


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
    """d logits for upstream gradients on every output (``grad_entropy`` None: no entropy)."""
    opts = LogProbOptions(temperature, softcap, ignore_index, grad_entropy is not None)
    grads = OutputGrads(grad_logp, grad_extra, grad_entropy, grad_lse)
    impl = get_backend(backend)
    return impl.logprobs_backward(
        grads, logits, target, extra_ids, vocab_bias, lse, entropy, opts
    ).contiguous()


@token_logprobs_backward_op.register_fake
def _(grad_logp, grad_extra, grad_entropy, grad_lse, logits, *rest):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, extra_ids, vocab_bias = inputs[:4]
    ctx.save_for_backward(logits, target, extra_ids, vocab_bias, output[3], output[2])
    ctx.opts = LogProbOptions(*inputs[4:8])
    ctx.backend = inputs[8]


def _backward(ctx, g_logp, g_extra, g_entropy, g_lse):
    logits, target, extra_ids, vocab_bias, lse, entropy = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0]:
        g = _grads(g_logp, g_extra, g_entropy, g_lse, ctx.opts)
        o = ctx.opts
        dlogits = token_logprobs_backward_op(
            *g, logits, target, extra_ids, vocab_bias, lse, entropy,
            o.temperature, o.softcap, o.ignore_index, ctx.backend,
        )  # fmt: skip
    return dlogits, *(None,) * 8


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Fused with the lm_head
# ---------------------------------------------------------------------------------------------


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
) -> Outputs:
    """As ``token_logprobs`` with ``logits = hidden @ weight.T + bias`` never materialised."""
    opts = LogProbOptions(temperature, softcap, ignore_index, need_entropy)
    impl = get_backend(backend)
    out = impl.linear_logprobs_forward(hidden, weight, bias, target, extra_ids, vocab_bias, opts)
    return _contiguous(out)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, target, extra_ids, vocab_bias, temperature, softcap, ignore_index,
      need_entropy, backend):
    return _fake_outputs(hidden, extra_ids.shape[0], need_entropy)


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
    opts = LogProbOptions(temperature, softcap, ignore_index, grad_entropy is not None)
    grads = OutputGrads(grad_logp, grad_extra, grad_entropy, grad_lse)
    needed = GradsNeeded(need_hidden, need_weight, need_bias)
    out = get_backend(backend).linear_logprobs_backward(
        grads, hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy, opts, needed
    )
    return _contiguous(out)


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_extra, grad_entropy, grad_lse, hidden, weight, bias, *rest):
    need_hidden, need_weight, need_bias = rest[-4:-1]
    def empty():  # one fresh tensor per output: outputs of an op may not alias
        return hidden.new_empty((0,))

    return (
        torch.empty_like(hidden) if need_hidden else empty(),
        torch.empty_like(weight) if need_weight else empty(),
        torch.empty_like(bias) if (need_bias and bias is not None) else empty(),
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, extra_ids, vocab_bias = inputs[:6]
    saved = (hidden, weight, bias, target, extra_ids, vocab_bias, output[3], output[2])
    ctx.save_for_backward(*saved)
    ctx.opts = LogProbOptions(*inputs[6:10])
    ctx.backend = inputs[10]


def _linear_backward(ctx, g_logp, g_extra, g_entropy, g_lse):
    hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    if not (need_h or need_w or need_b):
        return (None,) * 11
    g = _grads(g_logp, g_extra, g_entropy, g_lse, ctx.opts)
    o = ctx.opts
    dh, dw, db = linear_token_logprobs_backward_op(
        *g, hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy,
        o.temperature, o.softcap, o.ignore_index, need_h, need_w, need_b, ctx.backend,
    )  # fmt: skip
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, *(None,) * 8)


linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
