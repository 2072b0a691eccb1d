"""The ``"reference"`` backend: the readable PyTorch maths of :mod:`fastgfn.reference`.

This module also states the contract that :mod:`fastgfn.backends.cpp` and
:mod:`fastgfn.backends.triton` implement with the same signatures:

- ``subtb_forward(log_pf, log_pterm, log_r, lengths, lam) -> (num, den)``, ``[B]`` each in the
  accumulation dtype (docs/MATH.md §2);
- ``subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam) -> (d_pf, d_pt, d_r)`` in
  the inputs' dtypes;
- ``logprobs_forward(logits, target, extra_ids, vocab_bias, opts) -> (logp [N], extra [N, K],
  entropy [N] or [0], lse [N])`` in the accumulation dtype (docs/MATH.md §1);
- ``logprobs_backward(grads, logits, target, extra_ids, vocab_bias, lse, entropy, opts)
  -> d logits`` in the dtype of ``logits``;
- ``linear_logprobs_forward(hidden, weight, bias, target, extra_ids, vocab_bias, opts)``, outputs
  as ``logprobs_forward``;
- ``linear_logprobs_backward(grads, hidden, weight, bias, target, extra_ids, vocab_bias, lse,
  entropy, opts, needed) -> (d hidden, d weight, d bias)``, a gradient not ``needed`` (or a
  missing bias) is an empty tensor.

``opts`` is a :class:`~fastgfn.backends.options.LogProbOptions`, ``grads`` an
:class:`~fastgfn.backends.options.OutputGrads`, ``needed`` a
:class:`~fastgfn.backends.options.GradsNeeded`. Here the maths runs in the accumulation dtype
(fp32, float64 for float64 inputs); the tests run the same reference in float64 as the oracle.
"""

from __future__ import annotations

from fastgfn._dtypes import accumulation_dtype
from fastgfn.backends.options import GradsNeeded, LogProbOptions, OutputGrads
from fastgfn.reference.logprobs import (
    linear_logits,
    linear_token_logprobs_backward_reference,
    token_logprobs_backward_reference,
    token_logprobs_reference,
)
from fastgfn.reference.subtb import (
    subtb_pair_sums_backward_reference,
    subtb_pair_sums_reference,
)


def subtb_forward(log_pf, log_pterm, log_r, lengths, lam):
    num, den = subtb_pair_sums_reference(log_pf, log_pterm, log_r, lengths, lam)
    dtype = accumulation_dtype(log_pf, log_pterm, log_r)
    return num.to(dtype), den.to(dtype)


def subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam):
    grads = subtb_pair_sums_backward_reference(grad_num, log_pf, log_pterm, log_r, lengths, lam)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (log_pf, log_pterm, log_r)))


def _options(opts: LogProbOptions, vocab_bias, dtype) -> dict:
    return dict(
        temperature=opts.temperature,
        vocab_bias=vocab_bias,
        softcap=opts.softcap_or_none,
        ignore_index=opts.ignore_index,
        compute_dtype=dtype,
    )


def logprobs_forward(logits, target, extra_ids, vocab_bias, opts: LogProbOptions):
    dtype = accumulation_dtype(logits)
    logp, extra, entropy, lse = token_logprobs_reference(
        logits, target, extra_ids, **_options(opts, vocab_bias, dtype)
    )
    return logp, extra, entropy if opts.need_entropy else lse.new_empty((0,)), lse


def logprobs_backward(
    grads: OutputGrads, logits, target, extra_ids, vocab_bias, lse, entropy, opts: LogProbOptions
):
    dtype = accumulation_dtype(logits)
    dlogits = token_logprobs_backward_reference(
        *grads, logits, target, extra_ids, **_options(opts, vocab_bias, dtype)
    )
    return dlogits.to(logits.dtype)


def linear_logprobs_forward(hidden, weight, bias, target, extra_ids, vocab_bias, opts):
    logits = linear_logits(hidden, weight, bias, accumulation_dtype(hidden))
    return logprobs_forward(logits, target, extra_ids, vocab_bias, opts)


def linear_logprobs_backward(
    grads: OutputGrads,
    hidden,
    weight,
    bias,
    target,
    extra_ids,
    vocab_bias,
    lse,
    entropy,
    opts: LogProbOptions,
    needed: GradsNeeded,
):
    dtype = accumulation_dtype(hidden)
    dh, dw, db = linear_token_logprobs_backward_reference(
        *grads, hidden, weight, target, bias, extra_ids, **_options(opts, vocab_bias, dtype)
    )
    def empty():  # one fresh tensor per output: outputs of an op may not alias
        return hidden.new_empty((0,))

    return (
        dh.to(hidden.dtype) if needed.hidden else empty(),
        dw.to(weight.dtype) if needed.weight else empty(),
        db.to(bias.dtype) if (needed.bias and db is not None) else empty(),
    )
