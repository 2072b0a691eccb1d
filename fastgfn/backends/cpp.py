"""The ``"cpp"`` backend: the C++ CPU kernels (``kernels/cpu``, ops ``torch.ops.fastgfn_cpu.*``).

Same functions and signatures as :mod:`fastgfn.backends.reference`; this module only unpacks
the options into the kernels' flat schemas.
"""

from __future__ import annotations

import torch

from fastgfn._extension import require_cpu_kernels
from fastgfn.backends.options import GradsNeeded, LogProbOptions, OutputGrads


def _ops():
    require_cpu_kernels()
    return torch.ops.fastgfn_cpu


def _plain(*tensors):
    """The kernels write into scratch tiles with ``out=`` ops: hand them plain tensors."""
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


def _flat(opts: LogProbOptions):
    return opts.temperature, opts.softcap, opts.ignore_index


def subtb_forward(log_pf, log_pterm, log_r, lengths, lam):
    return _ops().subtb_forward(log_pf, log_pterm, log_r, lengths, lam)


def subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam):
    return _ops().subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam)


def logprobs_forward(logits, target, extra_ids, vocab_bias, opts: LogProbOptions):
    tensors = _plain(logits, target, extra_ids, vocab_bias)
    return _ops().logprobs_forward(*tensors, *_flat(opts), opts.need_entropy)


def logprobs_backward(
    grads: OutputGrads, logits, target, extra_ids, vocab_bias, lse, entropy, opts: LogProbOptions
):
    tensors = _plain(*grads, logits, target, extra_ids, vocab_bias, lse, entropy)
    return _ops().logprobs_backward(*tensors, *_flat(opts))


def linear_logprobs_forward(hidden, weight, bias, target, extra_ids, vocab_bias, opts):
    tensors = _plain(hidden, weight, bias, target, extra_ids, vocab_bias)
    return _ops().linear_logprobs_forward(*tensors, *_flat(opts), opts.need_entropy)


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
    tensors = _plain(*grads, hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy)
    return _ops().linear_logprobs_backward(*tensors, *_flat(opts), *needed)
