"""The SubTB pair-sum op: registration, backend dispatch and autograd.

``torch.ops.fastgfn.subtb_pair_sums(log_pf, log_pterm, log_r, lengths, lam, backend)`` returns
per-sequence ``(num, den)`` (docs/MATH.md §2; see ``fastgfn.reference.subtb``). Every loss in
``fastgfn.losses`` that sums over sub-trajectories reduces these two vectors.

Layering: the public loss functions validate arguments and resolve ``backend='auto'``
(:func:`fastgfn.backends.resolve_backend`) *before* calling the op, so dispatch happens outside
autograd and the op is a single opaque node for ``torch.compile``. The op's forward and
backward are themselves registered ops; each calls the backend module's ``subtb_forward`` /
``subtb_backward`` (:mod:`fastgfn.backends`).
"""

from __future__ import annotations

import torch

from fastgfn._dtypes import accumulation_dtype
from fastgfn.backends import get_backend

# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastgfn::subtb_pair_sums", mutates_args=())
def subtb_pair_sums(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``num = sum w res^2`` and ``den = sum w`` over sub-trajectories.

    For lam > 1 both are scaled by ``lam ** -(n_b - 1)`` so that nothing overflows (the
    ratio is unchanged; ``fastgfn.reference.subtb.pair_sums_log_scale`` gives the log factor).

    ``backend`` must already be resolved ('reference', 'cpp' or 'triton').
    """
    num, den = get_backend(backend).subtb_forward(log_pf, log_pterm, log_r, lengths, lam)
    return num, den


@subtb_pair_sums.register_fake
def _(log_pf, log_pterm, log_r, lengths, lam, backend):
    dtype = accumulation_dtype(log_pf, log_pterm, log_r)
    B = log_pf.shape[0]
    return log_pf.new_empty((B,), dtype=dtype), log_pf.new_empty((B,), dtype=dtype)


@torch.library.custom_op("fastgfn::subtb_pair_sums_backward", mutates_args=())
def subtb_pair_sums_backward(
    grad_num: torch.Tensor,
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_b grad_num[b] * num[b]`` w.r.t. log_pf, log_pterm and log_r."""
    impl = get_backend(backend)
    d_pf, d_pt, d_r = impl.subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam)
    return d_pf, d_pt, d_r


@subtb_pair_sums_backward.register_fake
def _(grad_num, log_pf, log_pterm, log_r, lengths, lam, backend):
    return torch.empty_like(log_pf), torch.empty_like(log_pterm), torch.empty_like(log_r)


def _setup_context(ctx, inputs, output):
    log_pf, log_pterm, log_r, lengths, lam, backend = inputs
    ctx.save_for_backward(log_pf, log_pterm, log_r, lengths)
    ctx.lam = lam
    ctx.backend = backend


def _backward(ctx, grad_num, grad_den):
    # den depends only on lengths and lam: it carries no gradient.
    log_pf, log_pterm, log_r, lengths = ctx.saved_tensors
    d_pf, d_pt, d_r = subtb_pair_sums_backward(
        grad_num, log_pf, log_pterm, log_r, lengths, ctx.lam, ctx.backend
    )
    return d_pf, d_pt, d_r, None, None, None


subtb_pair_sums.register_autograd(_backward, setup_context=_setup_context)
