"""Per-token log-probs from logits ``[N, V]``, Triton kernels: forward and backward.

Maths (DESIGN.md §2.1), with z' = c tanh(z / c) / tau + beta. A program owns BLOCK_N rows and
walks the vocabulary in BLOCK_V columns keeping, per row, the running max m, the rescaled sum
s = sum_v exp(z'_v - m) and the *centred* first moment u = sum_v exp(z'_v - m) (z'_v - m).
When the max moves from m to m' (d = m - m' <= 0):

    s' = e^d s + sum_new e^(z' - m'),      u' = e^d (u + d s) + sum_new e^(z' - m') (z' - m'),

and at the end lse = m + log s, entropy H = log s - u / s. Every term is of the size of a
log-probability, so rows with logits of ±1e4 lose nothing to cancellation. ``z' - m'`` is
clamped at -1000 (exp underflows to exactly 0 there) so that -inf bias entries give
0 * (-1000) = 0 instead of 0 * inf. The running max starts at -1e30 (finite) for the same
reason.

The target and extra-id logits are single columns: the launcher gathers and transforms them
with torch ops (N + N K elements) rather than matching columns inside the kernel.

Backward (one program per BLOCK_N rows x BLOCK_V columns, no reductions across programs):
    dz' = onehots - p (G + g_H (log p + H)),   G = g_y [y valid] + sum_k g_e,k - g_lse
    dz  = dz' / tau (1 - tanh^2(z / c)).
All maths is fp32 (fp64 never reaches these kernels' arithmetic: fp64 inputs compute in fp32
and the launcher returns fp32-accurate results in fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgfn._dtypes import accumulation_dtype

NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tanh_and_slope(x):
    """(tanh x, 1 - tanh^2 x) from e = exp(-2|x|) (no libdevice dependency):
    tanh |x| = (1 - e) / (1 + e) and 1 - tanh^2 = 4 e / (1 + e)^2. The slope is computed from
    e directly: in a saturated (confident) logit, 1 - t^2 from a rounded t loses all digits."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _transform(z, beta, inv_tau, softcap, HAS_SOFTCAP: tl.constexpr, HAS_BETA: tl.constexpr):
    """z [BN, BV] fp32 raw logits -> (z', d c tanh(z / c) / dz, or z when no softcap)."""
    t = z
    if HAS_SOFTCAP:
        th, t = _tanh_and_slope(z / softcap)
        z = th * (softcap * inv_tau)
    else:
        z = z * inv_tau
    if HAS_BETA:
        z = z + beta[None, :]
    return z, t


@triton.jit
def _online_update(x, m, s, u):
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
def _finish(m, s, u):
    """(lse, entropy) from the row statistics; rows with no finite logit get (-inf, 0)."""
    pos = s > 0
    log_s = tl.log(tl.where(pos, s, 1.0))
    lse = tl.where(pos, m + log_s, float("-inf"))
    ent = tl.where(pos, log_s - u / tl.where(pos, s, 1.0), 0.0)
    return lse, ent


@triton.jit
def _grad_tile(
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
    x, t = _transform(z, beta, inv_tau, softcap, HAS_SOFTCAP, HAS_BETA)
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


@triton.jit
def logprobs_stats_kernel(
    z_ptr,
    beta_ptr,
    lse_ptr,
    ent_ptr,
    N,
    V,
    stride_zn,
    inv_tau,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(
            z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0) if HAS_BETA else 0.0
        x, _ = _transform(z, beta, inv_tau, softcap, HAS_SOFTCAP, HAS_BETA)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m, s, u = _online_update(x, m, s, u)
    lse, ent = _finish(m, s, u)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ent_ptr + rows, ent, mask=row_mask)


@triton.jit
def logprobs_backward_kernel(
    z_ptr,
    beta_ptr,
    dz_ptr,
    lse_ptr,
    ent_ptr,
    G_ptr,
    gH_ptr,
    gy_ptr,
    y_ptr,
    ge_ptr,
    ex_ptr,
    N,
    V,
    K,
    stride_zn,
    stride_dzn,
    inv_tau,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(
        z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    dz = _grad_tile(
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
        HAS_SOFTCAP,
        HAS_BETA,
        HAS_GH,
    )
    tl.store(
        dz_ptr + rows[:, None].to(tl.int64) * stride_dzn + cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------------------------------------
# Host side (shared with linear_logprobs_triton)
# ---------------------------------------------------------------------------------------------


def transform_columns(z, beta_cols, temperature, softcap):
    """torch version of the transform for a few gathered columns (fp32, or fp64 given fp64)."""
    z = z if z.dtype == torch.float64 else z.float()
    if softcap > 0.0:
        z = softcap * torch.tanh(z / softcap)
    z = z * (1.0 / temperature)
    if beta_cols is not None:
        z = z + beta_cols.to(z.dtype)
    return z


def finish_outputs(tgt_logit, extra_logit, lse, ent, target, ignore_index, need_entropy, dtype):
    """Pack (logp, extra, entropy, lse) from gathered logits and row statistics."""
    valid = target != ignore_index
    logp = torch.where(valid, tgt_logit - lse, torch.zeros_like(lse))
    extra = extra_logit - lse[:, None]
    entropy = ent if need_entropy else lse.new_empty((0,))
    return logp.to(dtype), extra.to(dtype), entropy.to(dtype), lse.to(dtype)


def gathered_targets(target, ignore_index):
    valid = target != ignore_index
    return torch.where(valid, target, torch.zeros_like(target)).long(), valid


def row_coefficient(grad_logp, grad_extra, grad_lse, valid):
    G = grad_logp.float() * valid.float()
    if grad_extra.numel():
        G = G + grad_extra.float().sum(1)
    return (G - grad_lse.float()).contiguous()


def logprobs_forward(
    logits, target, extra_ids, vocab_bias, temperature, softcap, ignore_index, need_entropy
):
    N, V = logits.shape
    out_dtype = accumulation_dtype(logits)
    z = logits if logits.dtype != torch.float64 else logits.float()
    z = z.contiguous()
    beta = vocab_bias.float().contiguous() if vocab_bias is not None else None
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    ent = torch.empty(N if need_entropy else 1, device=logits.device, dtype=torch.float32)
    BLOCK_N, BLOCK_V = 4, 1024
    if N:
        logprobs_stats_kernel[(triton.cdiv(N, BLOCK_N),)](
            z,
            beta if beta is not None else lse,
            lse,
            ent,
            N,
            V,
            z.stride(0),
            1.0 / temperature,
            softcap if softcap > 0.0 else 1.0,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_BETA=beta is not None,
            WANT_ENTROPY=need_entropy,
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
        )
    safe, _ = gathered_targets(target, ignore_index)
    ex = extra_ids.long()
    tgt_logit = transform_columns(
        logits.gather(1, safe[:, None]).squeeze(1),
        beta[safe] if beta is not None else None,
        temperature,
        softcap,
    )
    extra_logit = transform_columns(
        logits[:, ex], beta[ex] if beta is not None else None, temperature, softcap
    )
    return finish_outputs(
        tgt_logit, extra_logit, lse, ent[:N], target, ignore_index, need_entropy, out_dtype
    )


def logprobs_backward(
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
    N, V = logits.shape
    z = (logits if logits.dtype != torch.float64 else logits.float()).contiguous()
    beta = vocab_bias.float().contiguous() if vocab_bias is not None else None
    safe, valid = gathered_targets(target, ignore_index)
    G = row_coefficient(grad_logp, grad_extra, grad_lse, valid)
    gy = (grad_logp.float() * valid.float()).contiguous()
    y = torch.where(valid, target, torch.full_like(target, -1)).to(torch.int32).contiguous()
    ge = grad_extra.float().contiguous()
    ex = extra_ids.to(torch.int32).contiguous()
    has_gh = grad_entropy is not None and grad_entropy.numel() == N
    gH = grad_entropy.float().contiguous() if has_gh else G
    ent = entropy.float().contiguous() if has_gh else G
    lse32 = lse.float().contiguous()
    dz = torch.empty((N, V), device=logits.device, dtype=z.dtype)
    BLOCK_N, BLOCK_V = 16, 256
    if N:
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))
        logprobs_backward_kernel[grid](
            z,
            beta if beta is not None else lse32,
            dz,
            lse32,
            ent,
            G,
            gH,
            gy,
            y,
            ge,
            ex,
            N,
            V,
            ex.numel(),
            z.stride(0),
            dz.stride(0),
            1.0 / temperature,
            softcap if softcap > 0.0 else 1.0,
            HAS_SOFTCAP=softcap > 0.0,
            HAS_BETA=beta is not None,
            HAS_GH=has_gh,
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
        )
    return dz.to(logits.dtype)


def aot_configs():
    """Every configuration the launchers can pick, for the sm_90 compile check (kernels/aot.py)."""
    from fastgfn.kernels.aot import AotConfig

    configs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for softcap in (False, True):
            for beta in (False, True):
                sig = {
                    "z_ptr": f"*{dtype}",
                    "beta_ptr": "*fp32",
                    "lse_ptr": "*fp32",
                    "ent_ptr": "*fp32",
                    "N": "i32",
                    "V": "i32",
                    "stride_zn": "i32",
                    "inv_tau": "fp32",
                    "softcap": "fp32",
                }
                const = {
                    "HAS_SOFTCAP": softcap,
                    "HAS_BETA": beta,
                    "WANT_ENTROPY": True,
                    "BLOCK_N": 4,
                    "BLOCK_V": 1024,
                }
                for k in const:
                    sig[k] = "constexpr"
                configs.append(
                    AotConfig(
                        f"logprobs_stats[{dtype},cap={softcap},beta={beta}]",
                        logprobs_stats_kernel,
                        sig,
                        const,
                        num_warps=4,
                    )
                )
                for has_gh in (False, True):
                    sig = {"z_ptr": f"*{dtype}", "beta_ptr": "*fp32", "dz_ptr": f"*{dtype}"}
                    for name in ("lse_ptr", "ent_ptr", "G_ptr", "gH_ptr", "gy_ptr"):
                        sig[name] = "*fp32"
                    sig.update(
                        {
                            "y_ptr": "*i32",
                            "ge_ptr": "*fp32",
                            "ex_ptr": "*i32",
                            "N": "i32",
                            "V": "i32",
                            "K": "i32",
                            "stride_zn": "i32",
                            "stride_dzn": "i32",
                            "inv_tau": "fp32",
                            "softcap": "fp32",
                        }
                    )
                    const = {
                        "HAS_SOFTCAP": softcap,
                        "HAS_BETA": beta,
                        "HAS_GH": has_gh,
                        "BLOCK_N": 16,
                        "BLOCK_V": 256,
                    }
                    for k in const:
                        sig[k] = "constexpr"
                    configs.append(
                        AotConfig(
                            f"logprobs_backward[{dtype},cap={softcap},beta={beta},gH={has_gh}]",
                            logprobs_backward_kernel,
                            sig,
                            const,
                            num_warps=4,
                        )
                    )
    return configs
