"""Per-token log-probs fused with the lm_head, Triton kernels: forward and backward.

The ``[N, V]`` logits exist only as ``[BLOCK_N, BLOCK_V]`` tiles in registers / shared memory:
each tile is ``z = h[rows] W[cols]^T (+ b)``, accumulated over H in BLOCK_H slices with
``tl.dot`` (tensor cores: wgmma on sm_90), fp32 accumulation.

Forward: one program per BLOCK_N rows walks the vocabulary, folding each tile into the row
statistics exactly as the from-logits kernel does (``logprobs_common_triton``: online max,
rescaled sum and centred first moment -> lse and entropy). The target / extra-id logits are
N (1 + K) dot products, gathered by the launcher with torch ops.

Backward: one program per (BLOCK_N rows, BLOCK_V columns) tile recomputes z, forms dz with the
shared gradient rule, and scatters both products with fp32 atomics:

    dh[rows, k-slice] += dz   @ W[cols, k-slice]
    dW[cols, k-slice] += dz^T @ h[rows, k-slice]       db[cols] += sum_rows dz

into fp32 accumulators (the weight gradient is accumulated in fp32 whatever the input
dtype), cast at the end. dz is rounded to the input dtype for the tensor-core products, as
the GEMMs of an eager backward would do. fp32 inputs use IEEE fp32 dots (no TF32), so fp32
results match an fp32 eager computation. ``IEEE`` (fp32 dots on fp32-converted operands) is
also what the launcher picks under the Triton interpreter, whose bf16/fp16 arithmetic is not
faithful; the 16-bit tensor-core path is checked by the sm_90 compile test.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgfn._dtypes import accumulation_dtype
from fastgfn.backends import triton_interpreter_enabled
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
def _logit_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    H,
    stride_hn,
    stride_wv,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IEEE: tl.constexpr,
):
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_hn + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_wv + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def linear_logprobs_stats_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    beta_ptr,
    lse_ptr,
    ent_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_tau,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
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
        z = _logit_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            H,
            stride_hn,
            stride_wv,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            IEEE,
        )
        beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0) if HAS_BETA else 0.0
        x, _ = transform(z, beta, inv_tau, softcap, HAS_SOFTCAP, HAS_BETA)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m, s, u = online_update(x, m, s, u)
    lse, ent = finish(m, s, u)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(ent_ptr + rows, ent, mask=row_mask)


@triton.jit
def linear_logprobs_backward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    beta_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
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
    H,
    K,
    stride_hn,
    stride_wv,
    inv_tau,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GH: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    z = _logit_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        H,
        stride_hn,
        stride_wv,
        HAS_BIAS,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
        IEEE,
    )
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
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_mask)
    if IEEE:
        dz_in = dz
    else:
        dz_in = dz.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        if NEED_DH:
            w = tl.load(
                w_ptr + cols[:, None].to(tl.int64) * stride_wv + ks[None, :],
                mask=col_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if IEEE:
                part = tl.dot(dz_in, w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(dz_in, w)
            tl.atomic_add(
                dh_ptr + rows[:, None].to(tl.int64) * H + ks[None, :],
                part,
                mask=row_mask[:, None] & k_mask[None, :],
            )
        if NEED_DW:
            a = tl.load(
                h_ptr + rows[:, None].to(tl.int64) * stride_hn + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if IEEE:
                part_w = tl.dot(tl.trans(dz_in), a.to(tl.float32), input_precision="ieee")
            else:
                part_w = tl.dot(tl.trans(dz_in), a)
            tl.atomic_add(
                dw_ptr + cols[:, None].to(tl.int64) * H + ks[None, :],
                part_w,
                mask=col_mask[:, None] & k_mask[None, :],
            )


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

# Tile shapes and launch options per (pass, dot kind): "tc" = 16-bit tensor-core dots (wgmma on
# sm_90), "ieee" = fp32 dots. Chosen so that every configuration compiles for sm_90 without
# register spills (tests/test_triton_aot.py). The forward and backward passes use the same
# BLOCK_H (the same order of accumulation over H), so that the backward recomputes bit-for-bit
# the logits whose logsumexp the forward saved: in a confident row 1 - p is a difference of
# nearly equal numbers, and any inconsistency between the two passes would be amplified there.
CONFIGS = {
    ("fwd", "tc"): (dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32), dict(num_warps=8, num_stages=3)),
    ("bwd", "tc"): (dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32), dict(num_warps=8, num_stages=2)),
    ("fwd", "ieee"): (dict(BLOCK_N=32, BLOCK_V=32, BLOCK_H=32), dict(num_warps=4, num_stages=2)),
    ("bwd", "ieee"): (dict(BLOCK_N=32, BLOCK_V=32, BLOCK_H=32), dict(num_warps=8, num_stages=1)),
}


def _ieee(h):
    return h.dtype == torch.float32 or triton_interpreter_enabled()


def _config(which, h, H):
    blocks, launch = CONFIGS[(which, "ieee" if _ieee(h) else "tc")]
    blocks = dict(blocks)
    blocks["BLOCK_H"] = min(blocks["BLOCK_H"], max(16, triton.next_power_of_2(H)))
    return blocks, launch


def _prepare(hidden, weight, bias, vocab_bias):
    dtype = torch.float32 if hidden.dtype == torch.float64 else hidden.dtype
    h = hidden.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    b = bias.float().contiguous() if bias is not None else None
    beta = vocab_bias.float().contiguous() if vocab_bias is not None else None
    return h, w, b, beta


def _gathered_logits(h, w, b, beta, ids, opts):
    """z'[n, ids[n, j]] for an index tensor ids [N, J] (fp32).

    These N (1 + K) dot products are computed in float64 (they are few): an fp32 dot of
    large-magnitude terms that cancel (a confident row) would otherwise add its own rounding,
    in a summation order different from the kernel's, to the target log-prob."""
    z = torch.einsum("nh,njh->nj", h.double(), w[ids].double())
    if b is not None:
        z = z + b[ids].double()
    return transform_columns(z, beta[ids] if beta is not None else None, opts).float()


def _launch_flags(opts, h, b, beta):
    return dict(
        inv_tau=1.0 / opts.temperature,
        softcap=opts.softcap if opts.softcap > 0.0 else 1.0,
        HAS_BIAS=b is not None,
        HAS_SOFTCAP=opts.softcap > 0.0,
        HAS_BETA=beta is not None,
        IEEE=_ieee(h),
    )


def linear_logprobs_forward(hidden, weight, bias, target, extra_ids, vocab_bias, opts):
    N, H = hidden.shape
    V = weight.shape[0]
    h, w, b, beta = _prepare(hidden, weight, bias, vocab_bias)
    lse = torch.empty(N, device=h.device, dtype=torch.float32)
    ent = torch.empty(N if opts.need_entropy else 1, device=h.device, dtype=torch.float32)
    blocks, launch = _config("fwd", h, H)
    if N:
        linear_logprobs_stats_kernel[(triton.cdiv(N, blocks["BLOCK_N"]),)](
            h,
            w,
            b if b is not None else lse,
            beta if beta is not None else lse,
            lse,
            ent,
            N,
            V,
            H,
            h.stride(0),
            w.stride(0),
            **_launch_flags(opts, h, b, beta),
            WANT_ENTROPY=opts.need_entropy,
            **blocks,
            **launch,
        )
    _, _, safe = checked_targets(target, opts.ignore_index, V)
    _, ex = checked_extra_ids(extra_ids, V, h.device)
    tgt_logit = _gathered_logits(h, w, b, beta, safe[:, None], opts)[:, 0]
    extra_logit = _gathered_logits(h, w, b, beta, ex[None, :].expand(N, -1), opts)
    out_dtype = accumulation_dtype(hidden)
    return finish_outputs(
        tgt_logit, extra_logit, lse, ent[:N], target, extra_ids, V, opts, out_dtype
    )


def linear_logprobs_backward(
    grads, hidden, weight, bias, target, extra_ids, vocab_bias, lse, entropy, opts, needed
):
    N, H = hidden.shape
    V = weight.shape[0]
    h, w, b, beta = _prepare(hidden, weight, bias, vocab_bias)
    rows = backward_rows(grads, target, extra_ids, V, lse, entropy, opts)
    need_bias = bool(needed.bias and b is not None)
    dh = torch.zeros((N, H) if needed.hidden else (1,), device=h.device, dtype=torch.float32)
    dw = torch.zeros((V, H) if needed.weight else (1,), device=h.device, dtype=torch.float32)
    db = torch.zeros((V,) if need_bias else (1,), device=h.device, dtype=torch.float32)
    blocks, launch = _config("bwd", h, H)
    if N and (needed.hidden or needed.weight or need_bias):
        grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(V, blocks["BLOCK_V"]))
        linear_logprobs_backward_kernel[grid](
            h,
            w,
            b if b is not None else rows.lse,
            beta if beta is not None else rows.lse,
            dh,
            dw,
            db,
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
            H,
            rows.ex.numel(),
            h.stride(0),
            w.stride(0),
            **_launch_flags(opts, h, b, beta),
            HAS_GH=rows.has_gh,
            NEED_DH=needed.hidden,
            NEED_DW=needed.weight,
            NEED_DB=need_bias,
            **blocks,
            **launch,
        )
    def empty():  # one fresh tensor per output: outputs of an op may not alias
        return hidden.new_empty((0,))

    return (
        dh.to(hidden.dtype) if needed.hidden else empty(),
        dw.to(weight.dtype) if needed.weight else empty(),
        db.to(bias.dtype) if need_bias else empty(),
    )


def aot_configs():
    """Every configuration the launchers can pick, for the sm_90 compile check (kernels/aot.py)."""
    from fastgfn.kernels.aot import AotConfig

    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        ieee = dtype == "fp32"
        for softcap in (False, True):
            sig = {
                "h_ptr": f"*{dtype}",
                "w_ptr": f"*{dtype}",
                "b_ptr": "*fp32",
                "beta_ptr": "*fp32",
                "lse_ptr": "*fp32",
                "ent_ptr": "*fp32",
                "N": "i32",
                "V": "i32",
                "H": "i32",
                "stride_hn": "i32",
                "stride_wv": "i32",
                "inv_tau": "fp32",
                "softcap": "fp32",
            }
            blocks, launch = CONFIGS[("fwd", "ieee" if ieee else "tc")]
            const = {
                "HAS_BIAS": True,
                "HAS_SOFTCAP": softcap,
                "HAS_BETA": True,
                "WANT_ENTROPY": True,
                "IEEE": ieee,
                **blocks,
            }
            for k in const:
                sig[k] = "constexpr"
            configs.append(
                AotConfig(
                    f"linear_logprobs_stats[{dtype},cap={softcap}]",
                    linear_logprobs_stats_kernel,
                    sig,
                    const,
                    **launch,
                    expect_wgmma=not ieee,
                )
            )
            for has_gh in (False, True):
                sig = {
                    "h_ptr": f"*{dtype}",
                    "w_ptr": f"*{dtype}",
                    "b_ptr": "*fp32",
                    "beta_ptr": "*fp32",
                    "dh_ptr": "*fp32",
                    "dw_ptr": "*fp32",
                    "db_ptr": "*fp32",
                }
                for name in ("lse_ptr", "ent_ptr", "G_ptr", "gH_ptr", "gy_ptr"):
                    sig[name] = "*fp32"
                sig.update(
                    {
                        "y_ptr": "*i32",
                        "ge_ptr": "*fp32",
                        "ex_ptr": "*i32",
                        "N": "i32",
                        "V": "i32",
                        "H": "i32",
                        "K": "i32",
                        "stride_hn": "i32",
                        "stride_wv": "i32",
                        "inv_tau": "fp32",
                        "softcap": "fp32",
                    }
                )
                blocks, launch = CONFIGS[("bwd", "ieee" if ieee else "tc")]
                const = {
                    "HAS_BIAS": True,
                    "HAS_SOFTCAP": softcap,
                    "HAS_BETA": True,
                    "HAS_GH": has_gh,
                    "NEED_DH": True,
                    "NEED_DW": True,
                    "NEED_DB": True,
                    "IEEE": ieee,
                    **blocks,
                }
                for k in const:
                    sig[k] = "constexpr"
                configs.append(
                    AotConfig(
                        f"linear_logprobs_backward[{dtype},cap={softcap},gH={has_gh}]",
                        linear_logprobs_backward_kernel,
                        sig,
                        const,
                        **launch,
                        expect_wgmma=not ieee,
                    )
                )
    return configs
