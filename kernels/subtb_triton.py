"""Modified sub-trajectory balance (SubTB), Triton kernels: one launch forward, one backward.

Maths (docs/MATH.md §2). With the potential of each prefix state of a sequence,

    G[j] = sum_{t<j} log_pf[t] + log_pterm[j] - log_r[j],        j = 0..n,

the residual of sub-trajectory i -> j is G[j] - G[i], and per sequence we need

    num = sum_{0<=i<j<=n} lam^(j-i-1) (G[j] - G[i])^2,     den = sum_{i<j} lam^(j-i-1).

One program handles one sequence and walks its states in chunks of BLOCK positions. Pairs
inside a chunk are a BLOCK x BLOCK tile (all lanes busy). Pairs whose start lies in an earlier
chunk are summarised by carried moments, centred on the last potential of the previous
chunk, G[q]:

    M_k = sum_{i<=q} lam^(q-i) (G[q] - G[i])^k,      k = 0, 1, 2,

so for j = q + 1 + m:  sum_{i<=q} lam^(j-1-i) (G[j] - G[i])^2
                        = lam^m (M_0 D^2 + 2 D M_1 + M_2),   D = G[j] - G[q].

Moving the centre by E over a chunk: M_0' = lam^B M_0 + (chunk),
M_1' = lam^B (M_1 + E M_0) + (chunk), M_2' = lam^B (M_2 + 2 E M_1 + E^2 M_0) + (chunk).
Work is O(n * BLOCK) per sequence, with n / BLOCK sequential steps.

Backward for an upstream gradient g on num: dnum/dG[k] = 2 g (A_1(k) - R_1(k)), where
A_1(k) = sum_{i<k} lam^(k-1-i) (G[k] - G[i]) (pairs ending at k, a forward sweep as above) and
R_1(k) = sum_{k<j<=n} lam^(j-k-1) (G[j] - G[k]) (pairs starting at k, a reverse sweep with
moments centred on the first potential of the following chunk). Then
d log_pterm[k] = dG[k], d log_r[k] = -dG[k], d log_pf[t] = sum_{t<k<=n} dG[k] (a reverse
cumulative sum carried across chunks). The forward sweep of the backward kernel parks G and
A_1 in an fp32 workspace that the reverse sweep of the same program reads back.

lam > 1 (docs/MATH.md §2): num and den come out scaled by lam^-(n-1). Every pair weight is
then used at that final scale (exponents j - i - 1 - (n - 1) <= 0, so nothing overflows and
what underflows is negligible next to the pair (0, n) of weight 1), and the carried moments
are kept relative to their latest pair start: M_k = sum_{i<=q} lam^-i (G[q] - G[i])^k,
carried with factor 1 instead of lam^BLOCK; the reverse sweep's R_k likewise as
sum_j lam^(j-n) (...). For lam <= 1 every scale factor is 1.

All maths is fp32 whatever the input dtypes; positions past n are never loaded (masked loads),
so non-finite padding cannot leak; padded gradients stay at the zeros they were allocated with.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgfn._dtypes import accumulation_dtype


@triton.jit
def _lam_pow(e, off, log2_lam):
    """lam ** (e - off) = 2 ** ((e - off) log2 lam) for integers e >= 0 and off (lam == 0
    arrives as log2_lam = -16384 with off = 0, so that 0 ** 0 == 1 and 0 ** e == 0 for
    e >= 1 without evaluating 0 * inf)."""
    return tl.exp2((tl.maximum(e, 0) - off).to(tl.float32) * log2_lam)


@triton.jit
def _chunk_weights(m, c, n, log2_lam, rescale, BLOCK: tl.constexpr):
    """(lam^m, lam^(BLOCK-1-m)) for chunk c, each times its scale factor when rescaling:
    lam^(j-n) and lam^-i for the positions j = i = c BLOCK + m of the chunk."""
    w_cross = _lam_pow(m, rescale * (n - c * BLOCK), log2_lam)
    w_tail = _lam_pow(BLOCK - 1 - m, rescale * (c * BLOCK + BLOCK - 1), log2_lam)
    return w_cross, w_tail


@triton.jit
def _chunk_potentials(pf_row, pt_row, r_row, stride_pf, stride_pt, stride_r, s, n, F_carry):
    """G[s] for the positions s of one chunk (0 past n) and the updated running sum of log_pf."""
    pf = tl.load(pf_row + s * stride_pf, mask=s < n, other=0.0).to(tl.float32)
    pt = tl.load(pt_row + s * stride_pt, mask=s <= n, other=0.0).to(tl.float32)
    r = tl.load(r_row + s * stride_r, mask=s <= n, other=0.0).to(tl.float32)
    F = F_carry + (tl.cumsum(pf, 0) - pf)  # exclusive prefix sum: sum_{t<s} log_pf[t]
    G = tl.where(s <= n, F + pt - r, 0.0)
    return G, F_carry + tl.sum(pf, 0)


@triton.jit
def subtb_forward_kernel(
    pf_ptr, pt_ptr, r_ptr, len_ptr, num_ptr, den_ptr,
    T,
    stride_pf_b, stride_pf_t, stride_pt_b, stride_pt_t, stride_r_b, stride_r_t,
    log2_lam, carry, rescale,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 0), T)
    pf_row = pf_ptr + b.to(tl.int64) * stride_pf_b
    pt_row = pt_ptr + b.to(tl.int64) * stride_pt_b
    r_row = r_ptr + b.to(tl.int64) * stride_r_b

    m = tl.arange(0, BLOCK)
    e = m[None, :] - m[:, None] - 1  # rows i, columns j: j - i - 1
    # Intra-chunk pair weights lam^(j-i-1) (i < j, else 0), at the final scale.
    w_pair = tl.where(e >= 0, _lam_pow(e, rescale * (n - 1), log2_lam), 0.0)

    M0 = 0.0
    M1 = 0.0
    M2 = 0.0
    G_q = 0.0
    F = 0.0
    num = 0.0
    den = 0.0
    for c in range(0, n // BLOCK + 1):
        s = c * BLOCK + m
        G, F = _chunk_potentials(pf_row, pt_row, r_row, stride_pf_t, stride_pt_t, stride_r_t,
                                 s, n, F)
        w_cross, w_tail = _chunk_weights(m, c, n, log2_lam, rescale, BLOCK)
        D = G - G_q
        diff = D[None, :] - D[:, None]  # G[j] - G[i]
        intra2 = tl.sum(w_pair * diff * diff, 0)
        intra0 = tl.sum(w_pair, 0)
        valid = s <= n
        num += tl.sum(tl.where(valid, w_cross * (M0 * D * D + 2.0 * D * M1 + M2) + intra2, 0.0), 0)
        den += tl.sum(tl.where(valid, w_cross * M0 + intra0, 0.0), 0)
        # Re-centre the carried moments on the chunk's last potential and add the chunk.
        G_last = tl.sum(tl.where(m == BLOCK - 1, G, 0.0), 0)
        E = G_last - G_q
        back = G_last - G
        M2 = carry * (M2 + 2.0 * E * M1 + E * E * M0) + tl.sum(w_tail * back * back, 0)
        M1 = carry * (M1 + E * M0) + tl.sum(w_tail * back, 0)
        M0 = carry * M0 + tl.sum(w_tail, 0)
        G_q = G_last
    tl.store(num_ptr + b, num.to(num_ptr.dtype.element_ty))
    tl.store(den_ptr + b, den.to(den_ptr.dtype.element_ty))


@triton.jit
def subtb_backward_kernel(
    grad_ptr, pf_ptr, pt_ptr, r_ptr, len_ptr, dpf_ptr, dpt_ptr, dr_ptr, ws_ptr,
    T,
    stride_pf_b, stride_pf_t, stride_pt_b, stride_pt_t, stride_r_b, stride_r_t,
    log2_lam, carry, rescale,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 0), T)
    two_g = 2.0 * tl.load(grad_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    pf_row = pf_ptr + b64 * stride_pf_b
    pt_row = pt_ptr + b64 * stride_pt_b
    r_row = r_ptr + b64 * stride_r_b
    ws_G = ws_ptr + b64 * (2 * (T + 1))  # workspace rows: G, then A_1
    ws_A1 = ws_G + (T + 1)

    m = tl.arange(0, BLOCK)
    e = m[None, :] - m[:, None] - 1
    # [i, j]: lam^(j-i-1) for i < j, at the final scale
    w_pair = tl.where(e >= 0, _lam_pow(e, rescale * (n - 1), log2_lam), 0.0)

    # Forward sweep: A_1(j) for every state j <= n.
    M0 = 0.0
    M1 = 0.0
    G_q = 0.0
    F = 0.0
    for c in range(0, n // BLOCK + 1):
        s = c * BLOCK + m
        G, F = _chunk_potentials(pf_row, pt_row, r_row, stride_pf_t, stride_pt_t, stride_r_t,
                                 s, n, F)
        w_cross, w_tail = _chunk_weights(m, c, n, log2_lam, rescale, BLOCK)
        D = G - G_q
        A1 = w_cross * (M0 * D + M1) + tl.sum(w_pair * (D[None, :] - D[:, None]), 0)
        tl.store(ws_G + s, G, mask=s <= n)
        tl.store(ws_A1 + s, A1, mask=s <= n)
        G_last = tl.sum(tl.where(m == BLOCK - 1, G, 0.0), 0)
        E = G_last - G_q
        M1 = carry * (M1 + E * M0) + tl.sum(w_tail * (G_last - G), 0)
        M0 = carry * M0 + tl.sum(w_tail, 0)
        G_q = G_last
    tl.debug_barrier()

    # Reverse sweep: R_1(k), dG[k] and the suffix sums for d log_pf. Carried moments of the
    # pairs that start before the following chunk's first state p, centred on G[p]:
    # R_k = sum_{p<=j<=n} lam^(j-p) (G[j] - G[p])^k.
    R0 = 0.0
    R1 = 0.0
    G_p = 0.0
    suffix = 0.0
    last_chunk = n // BLOCK
    for cc in range(0, last_chunk + 1):
        c = last_chunk - cc
        s = c * BLOCK + m
        valid = s <= n
        G = tl.load(ws_G + s, mask=valid, other=0.0)
        A1 = tl.load(ws_A1 + s, mask=valid, other=0.0)
        w_head, w_tail = _chunk_weights(m, c, n, log2_lam, rescale, BLOCK)
        # Pairs k -> j inside the chunk (rows k, columns j), j <= n.
        w_in = tl.where(valid[None, :], w_pair, 0.0)
        R1_k = tl.sum(w_in * (G[None, :] - G[:, None]), 1)
        R1_k += w_tail * (R1 + (G_p - G) * R0)  # lam^(BLOCK-1-m) = lam^(p-1-k) (times lam^-(p-1))
        dG = tl.where(valid, two_g * (A1 - R1_k), 0.0)
        tl.store(dpt_ptr + b64 * (T + 1) + s, dG.to(dpt_ptr.dtype.element_ty), mask=valid)
        tl.store(dr_ptr + b64 * (T + 1) + s, (-dG).to(dr_ptr.dtype.element_ty), mask=valid)
        d_pf = suffix + (tl.cumsum(dG, 0, reverse=True) - dG)  # sum_{k>t} dG[k]
        tl.store(dpf_ptr + b64 * T + s, d_pf.to(dpf_ptr.dtype.element_ty), mask=s < n)
        suffix += tl.sum(dG, 0)
        G_first = tl.sum(tl.where(m == 0, G, 0.0), 0)
        w_head = tl.where(valid, w_head, 0.0)  # lam^(j - p'') for j in this chunk (lam^(j - n))
        R1 = carry * (R1 + (G_p - G_first) * R0) + tl.sum(w_head * (G - G_first), 0)
        R0 = carry * R0 + tl.sum(w_head, 0)
        G_p = G_first


def _block_size(T: int) -> int:
    return max(16, min(64, triton.next_power_of_2(T + 1)))


def _lam_constants(lam: float, block: int) -> tuple[float, float, int]:
    """(log2 lam, the factor on carried moments per chunk, rescale): lam > 1 runs at the final
    scale lam^-(n-1) with carried moments relative to their latest pair start (factor 1)."""
    log2_lam = math.log2(lam) if lam > 0 else -16384.0
    rescale = int(lam > 1.0)
    return log2_lam, 1.0 if rescale else float(lam) ** block, rescale


def subtb_forward(log_pf, log_pterm, log_r, lengths, lam: float):
    """Launch the forward kernel: per-sequence (num, den)."""
    B, T = log_pf.shape
    dtype = accumulation_dtype(log_pf, log_pterm, log_r)
    num = torch.empty(B, dtype=dtype, device=log_pf.device)
    den = torch.empty(B, dtype=dtype, device=log_pf.device)
    if B == 0:
        return num, den
    block = _block_size(T)
    lam_args = _lam_constants(lam, block)
    subtb_forward_kernel[(B,)](
        log_pf, log_pterm, log_r, lengths, num, den,
        T,
        log_pf.stride(0), log_pf.stride(1), log_pterm.stride(0), log_pterm.stride(1),
        log_r.stride(0), log_r.stride(1),
        *lam_args,
        BLOCK=block, num_warps=4,
    )
    return num, den


def subtb_backward(grad_num, log_pf, log_pterm, log_r, lengths, lam: float):
    """Launch the backward kernel: gradients of sum_b grad_num[b] * num[b]."""
    B, T = log_pf.shape
    d_pf = torch.zeros((B, T), dtype=log_pf.dtype, device=log_pf.device)
    d_pt = torch.zeros((B, T + 1), dtype=log_pterm.dtype, device=log_pf.device)
    d_r = torch.zeros((B, T + 1), dtype=log_r.dtype, device=log_pf.device)
    if B == 0:
        return d_pf, d_pt, d_r
    workspace = torch.empty((B, 2, T + 1), dtype=torch.float32, device=log_pf.device)
    block = _block_size(T)
    lam_args = _lam_constants(lam, block)
    subtb_backward_kernel[(B,)](
        grad_num.contiguous(), log_pf, log_pterm, log_r, lengths, d_pf, d_pt, d_r, workspace,
        T,
        log_pf.stride(0), log_pf.stride(1), log_pterm.stride(0), log_pterm.stride(1),
        log_r.stride(0), log_r.stride(1),
        *lam_args,
        BLOCK=block, num_warps=4,
    )
    return d_pf, d_pt, d_r


def aot_configs():
    """Every configuration the launchers can pick, for the sm_90 compile check (kernels/aot.py)."""
    from fastgfn.kernels.aot import AotConfig

    configs = []
    for kernel in (subtb_forward_kernel, subtb_backward_kernel):
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for block in (16, 32, 64):
                signature = {}
                for name in kernel.arg_names:
                    if name == "len_ptr":
                        signature[name] = "*i64"
                    elif name in ("pf_ptr", "pt_ptr", "r_ptr", "dpf_ptr", "dpt_ptr", "dr_ptr"):
                        signature[name] = f"*{dtype}"
                    elif name.endswith("_ptr"):  # num/den/grad follow fp64, workspace is fp32
                        wide = dtype == "fp64" and name != "ws_ptr"
                        signature[name] = "*fp64" if wide else "*fp32"
                    elif name in ("log2_lam", "carry"):
                        signature[name] = "fp32"
                    elif name == "BLOCK":
                        signature[name] = "constexpr"
                    else:
                        signature[name] = "i32"
                configs.append(AotConfig(f"{kernel.fn.__name__}[{dtype},BLOCK={block}]", kernel,
                                         signature, {"BLOCK": block}))
    return configs
