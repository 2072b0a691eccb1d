"""Shared pieces of the per-token log-prob Triton kernels (``logprobs_triton``: from logits,
``linear_logprobs_triton``: fused with the lm_head), as ``cpu/logprobs_common.h`` is for the
C++ kernels. Maths: docs/MATH.md §1.

Row statistics, online. A program walks the vocabulary in tiles keeping, per row, the running
max m, the rescaled sum s = sum_v exp(z'_v - m) and the *centred* first moment
u = sum_v exp(z'_v - m) (z'_v - m). When the max moves from m to m' (d = m - m' <= 0):

    s' = e^d s + sum_new e^(z' - m'),      u' = e^d (u + d s) + sum_new e^(z' - m') (z' - m'),

and at the end lse = m + log s, entropy H = log s - u / s. Every term is of the size of a
log-probability, so rows with logits of ±1e4 lose nothing to cancellation. ``z' - m'`` is
clamped at -1000 (exp underflows to exactly 0 there) so that -inf bias entries give
0 * (-1000) = 0 instead of 0 * inf. The running max starts at -1e30 (finite) for the same
reason.

Gradient of a tile (no reductions across programs):
    dz' = onehots - p (G + g_H (log p + H)),   G = g_y [y valid] + sum_k g_e,k - g_lse
    dz  = dz' / tau (1 - tanh^2(z / c)).

Host side: the target and extra-id logits are single columns, gathered and transformed by the
launchers with torch ops (N + N K elements) rather than matched inside the kernels, and the
per-row inputs of the backward are prepared once (:func:`backward_rows`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastgfn.reference.logprobs import checked_extra_ids, checked_targets

NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def tanh_and_slope(x):
    """(tanh x, 1 - tanh^2 x) from e = exp(-2|x|) (no libdevice dependency):
    tanh |x| = (1 - e) / (1 + e) and 1 - tanh^2 = 4 e / (1 + e)^2. The slope is computed from
    e directly: in a saturated (confident) logit, 1 - t^2 from a rounded t loses all digits."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def transform(z, beta, inv_tau, softcap, HAS_SOFTCAP: tl.constexpr, HAS_BETA: tl.constexpr):
    """z [BN, BV] fp32 raw logits -> (z', d c tanh(z / c) / dz, or z when no softcap)."""
    t = z
    if HAS_SOFTCAP:
        th, t = tanh_and_slope(z / softcap)
        z = th * (softcap * inv_tau)
    else:
        z = z * inv_tau
    if HAS_BETA:
        z = z + beta[None, :]
    return z, t


@triton.jit
def online_update(x, m, s, u):
    """Fold a tile x [BN, BV] of z' (masked entries -inf) into the row statistics m, s, u."""
    m_new = tl.maximum(m, tl.max(x, 1))
    d = m - m_new
    alpha = tl.exp(d)
    y = tl.maximum(x - m_new[:, None], -1000.0)
    e = tl.exp(y)
    s_new = alpha * s + tl.sum(e, 1)
    u_new = alpha * (u + d * s) + tl.sum(e * y, 1)
    return m_new, s_new, u_new


@triton.jit
def finish(m, s, u):
    """(lse, entropy) from the row statistics; rows with no finite logit get (-inf, 0)."""
    pos = s > 0
    log_s = tl.log(tl.where(pos, s, 1.0))
    lse = tl.where(pos, m + log_s, float("-inf"))
    ent = tl.where(pos, log_s - u / tl.where(pos, s, 1.0), 0.0)
    return lse, ent


@triton.jit
def grad_tile(
    z,
    rows,
    cols,
    row_mask,
    col_mask,
    beta_ptr,
    lse_ptr,
    ent_ptr,
    G_ptr,
    gH_ptr,
    gy_ptr,
    y_ptr,
    ge_ptr,
    ex_ptr,
    K,
    inv_tau,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GH: tl.constexpr,
):
    """dz (w.r.t. the raw logits) of a tile of raw logits ``z`` (fp32): applies the transform
    to get z' = x, loads the per-row statistics and upstream gradients, and returns dz."""
    beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0) if HAS_BETA else 0.0
    x, t = transform(z, beta, inv_tau, softcap, HAS_SOFTCAP, HAS_BETA)
    x = tl.where(col_mask[None, :], x, float("-inf"))
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    G = tl.load(G_ptr + rows, mask=row_mask, other=0.0)
    gy = tl.load(gy_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    lp = tl.maximum(x - lse[:, None], -1000.0)
    p = tl.exp(lp)
    if HAS_GH:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        gH = tl.load(gH_ptr + rows, mask=row_mask, other=0.0)
        coef = G[:, None] + gH[:, None] * (lp + ent[:, None])
    else:
        coef = G[:, None] + 0.0 * lp
    dz = -p * coef
    dz += tl.where(cols[None, :] == y[:, None], gy[:, None], 0.0)
    for k in range(K):
        e = tl.load(ex_ptr + k)
        ge = tl.load(ge_ptr + rows.to(tl.int64) * K + k, mask=row_mask, other=0.0)
        dz += tl.where(cols[None, :] == e, ge[:, None], 0.0)
    if HAS_SOFTCAP:
        dz = dz * t  # t holds the slope 1 - tanh^2(z / c)
    dz = dz * inv_tau
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def transform_columns(z, beta_cols, opts):
    """torch version of the transform for a few gathered columns (fp32, or fp64 given fp64)."""
    z = z if z.dtype == torch.float64 else z.float()
    if opts.softcap > 0.0:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    z = z * (1.0 / opts.temperature)
    if beta_cols is not None:
        z = z + beta_cols.to(z.dtype)
    return z


def finish_outputs(tgt_logit, extra_logit, lse, ent, target, extra_ids, V, opts, dtype):
    """Pack (logp, extra, entropy, lse) from gathered logits and row statistics; ids out of
    range give NaN (docs/MATH.md §1)."""
    valid, bad, _ = checked_targets(target, opts.ignore_index, V)
    logp = torch.where(valid, tgt_logit - lse, torch.where(bad, torch.nan, torch.zeros_like(lse)))
    ok, _ = checked_extra_ids(extra_ids, V, lse.device)
    extra = torch.where(ok, extra_logit - lse[:, None], torch.nan)
    entropy = ent if opts.need_entropy else lse.new_empty((0,))
    return logp.to(dtype), extra.to(dtype), entropy.to(dtype), lse.to(dtype)


class BackwardRows(NamedTuple):
    """Per-row inputs of a backward kernel, fp32 (int32 ids), contiguous."""

    G: torch.Tensor  # g_y [y valid] + sum_k g_e,k - g_lse
    gy: torch.Tensor  # g_y [y valid]
    y: torch.Tensor  # target, -1 on ignored rows
    ge: torch.Tensor  # [N, K]
    ex: torch.Tensor  # [K]
    gH: torch.Tensor  # entropy gradient (G as a placeholder when there is none)
    ent: torch.Tensor  # saved entropy (likewise)
    lse: torch.Tensor
    has_gh: bool


def backward_rows(grads, target, extra_ids, V, lse, entropy, opts) -> BackwardRows:
    """Out-of-range ids (constant NaN outputs) get no gradient: their g_y / g_e count as 0."""
    valid, _, _ = checked_targets(target, opts.ignore_index, V)
    ok, _ = checked_extra_ids(extra_ids, V, target.device)
    gy = torch.where(valid, grads.logp.float(), 0.0).contiguous()
    ge = torch.where(ok, grads.extra.float(), 0.0).contiguous()
    G = gy
    if ge.numel():
        G = G + ge.sum(1)
    G = (G - grads.lse.float()).contiguous()
    has_gh = grads.entropy is not None and grads.entropy.numel() == target.shape[0]
    return BackwardRows(
        G=G,
        gy=gy,
        y=torch.where(valid, target, torch.full_like(target, -1)).to(torch.int32).contiguous(),
        ge=ge,
        ex=extra_ids.to(torch.int32).contiguous(),
        gH=grads.entropy.float().contiguous() if has_gh else G,
        ent=entropy.float().contiguous() if has_gh else G,
        lse=lse.float().contiguous(),
        has_gh=has_gh,
    )
