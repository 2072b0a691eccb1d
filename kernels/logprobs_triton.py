"""Per-token log-probs from logits ``[N, V]``, Triton kernels: forward and backward.

Maths: docs/MATH.md §1, with z' = c tanh(z / c) / tau + beta. The forward kernel gives each
program BLOCK_N rows and walks the vocabulary in BLOCK_V columns, folding every tile into the
online row statistics of ``logprobs_common_triton`` (lse and entropy). The backward kernel
gives each program one BLOCK_N x BLOCK_V tile of d logits (the shared gradient rule). The
target and extra-id logits are gathered by the launcher. All maths is fp32 (fp64 inputs
compute in fp32 and the launcher returns fp32-accurate results in fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgfn._dtypes import accumulation_dtype
from fastgfn.reference.logprobs import checked_extra_ids, checked_targets

from .logprobs_common_triton import (
    NEG_BIG,
    backward_rows,
    finish,
    finish_outputs,
    grad_tile,
    online_update,
    transform,
    transform_columns,
)


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
        x, _ = transform(z, beta, inv_tau, softcap, HAS_SOFTCAP, HAS_BETA)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m, s, u = online_update(x, m, s, u)
    lse, ent = finish(m, s, u)
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
    dz = grad_tile(
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
# Host side
# ---------------------------------------------------------------------------------------------


def _prepare(logits, vocab_bias):
    z = logits if logits.dtype != torch.float64 else logits.float()
    beta = vocab_bias.float().contiguous() if vocab_bias is not None else None
    return z.contiguous(), beta


def _transform_flags(opts, beta):
    return dict(
        inv_tau=1.0 / opts.temperature,
        softcap=opts.softcap if opts.softcap > 0.0 else 1.0,
        HAS_SOFTCAP=opts.softcap > 0.0,
        HAS_BETA=beta is not None,
    )


def logprobs_forward(logits, target, extra_ids, vocab_bias, opts):
    N, V = logits.shape
    z, beta = _prepare(logits, vocab_bias)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    ent = torch.empty(N if opts.need_entropy else 1, device=logits.device, dtype=torch.float32)
    if N:
        logprobs_stats_kernel[(triton.cdiv(N, 4),)](
            z,
            beta if beta is not None else lse,
            lse,
            ent,
            N,
            V,
            z.stride(0),
            **_transform_flags(opts, beta),
            WANT_ENTROPY=opts.need_entropy,
            BLOCK_N=4,
            BLOCK_V=1024,
        )
    _, _, safe = checked_targets(target, opts.ignore_index, V)
    _, ex = checked_extra_ids(extra_ids, V, logits.device)
    tgt_logit = transform_columns(
        logits.gather(1, safe[:, None]).squeeze(1), beta[safe] if beta is not None else None, opts
    )
    extra_logit = transform_columns(logits[:, ex], beta[ex] if beta is not None else None, opts)
    out_dtype = accumulation_dtype(logits)
    return finish_outputs(
        tgt_logit, extra_logit, lse, ent[:N], target, extra_ids, V, opts, out_dtype
    )


def logprobs_backward(grads, logits, target, extra_ids, vocab_bias, lse, entropy, opts):
    N, V = logits.shape
    z, beta = _prepare(logits, vocab_bias)
    rows = backward_rows(grads, target, extra_ids, V, lse, entropy, opts)
    dz = torch.empty((N, V), device=logits.device, dtype=z.dtype)
    BLOCK_N, BLOCK_V = 16, 256
    if N:
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))
        logprobs_backward_kernel[grid](
            z,
            beta if beta is not None else rows.lse,
            dz,
            rows.lse,
            rows.ent,
            rows.G,
            rows.gH,
            rows.gy,
            rows.y,
            rows.ge,
            rows.ex,
            N,
            V,
            rows.ex.numel(),
            z.stride(0),
            dz.stride(0),
            **_transform_flags(opts, beta),
            HAS_GH=rows.has_gh,
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
