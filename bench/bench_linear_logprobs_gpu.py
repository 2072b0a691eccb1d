"""GPU benchmark: fused lm_head + per-token log-probs (Triton) vs eager, torch.compile,
Liger-Kernel's fused linear cross entropy and cut-cross-entropy; forward + backward, bf16.

Correctness first (every variant's values and gradients against an fp32 eager computation on
a small shape), then timing with ``triton.testing.do_bench`` (median of repeated runs) and
TFLOP/s. Work counted: the three GEMMs any implementation needs (logits, d hidden, d weight)
= 6 N H V flops; the fused kernel also recomputes the logits in the backward (8 N H V), so
the roofline fraction is reported against a measured bf16 ``torch.mm`` rate on this GPU.
Peak memory per variant: ``torch.cuda.max_memory_allocated`` above the inputs.

    python bench/bench_linear_logprobs_gpu.py                     # N=8192 H=4096 V=128256
    python bench/bench_linear_logprobs_gpu.py --n 4096 --no-compile

Liger-Kernel (``pip install liger-kernel``) and cut-cross-entropy (``pip install
cut-cross-entropy``) are optional; a variant whose package is missing is reported as skipped.
They compute the target log-prob only (a loss); for the termination column they are called a
second time, as eager is.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TERM = 2


def variants(use_compile: bool):
    import fastgfn

    def fused(h, w, target):
        out = fastgfn.linear_token_logprobs(h, w, target, extra_ids=[TERM], backend="triton")
        return out.logp, out.extra[:, 0]

    def eager(h, w, target):
        lsm = torch.log_softmax((h @ w.T).float(), -1)
        return lsm.gather(1, target[:, None])[:, 0], lsm[:, TERM]

    out = {"fastgfn triton": fused, "eager": eager}
    if use_compile:
        out["torch.compile"] = torch.compile(eager)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, target):
            a = -liger_fused_linear_cross_entropy(h, w, target, reduction="none")
            b = -liger_fused_linear_cross_entropy(
                h, w, torch.full_like(target, TERM), reduction="none"
            )
            return a, b

        out["liger fused linear CE"] = liger
    except Exception as exc:  # noqa: BLE001 - optional dependency
        out["liger fused linear CE"] = f"skipped ({type(exc).__name__}: {exc})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        def cut(h, w, target):
            a = -cce(h, w, target, reduction="none")
            b = -cce(h, w, torch.full_like(target, TERM), reduction="none")
            return a, b

        out["cut-cross-entropy"] = cut
    except Exception as exc:  # noqa: BLE001
        out["cut-cross-entropy"] = f"skipped ({type(exc).__name__}: {exc})"
    return out


def inputs(n, hdim, vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, hdim, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, device="cuda", generator=g) / hdim**0.5).to(dtype)
    w.requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    g1 = torch.randn(n, device="cuda", generator=g)
    g2 = torch.randn(n, device="cuda", generator=g)
    return h, w, target, g1, g2


def fwd_bwd(fn, h, w, target, g1, g2):
    h.grad = w.grad = None
    a, b = fn(h, w, target)
    torch.autograd.backward([a.float(), b.float()], [g1, g2])
    return a, b


def check(fns, dtype):
    """Max abs error of values and gradients vs fp32 eager from the same bf16 inputs."""
    h, w, target, g1, g2 = inputs(512, 256, 32000, dtype, seed=1)
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    ref = fwd_bwd(fns["eager"], h32, w32, target, g1, g2)
    rows = {}
    for name, fn in fns.items():
        if isinstance(fn, str):
            continue
        a, b = fwd_bwd(fn, h, w, target, g1, g2)
        rows[name] = max(
            float((a.float() - ref[0]).abs().max()),
            float((b.float() - ref[1]).abs().max()),
            float((h.grad.float() - h32.grad).abs().max()),
            float((w.grad.float() - w32.grad).abs().max()),
        )
    return rows


def bench_matmul(n, hd, v, dtype):
    from triton.testing import do_bench

    a = torch.randn(n, hd, device="cuda", dtype=dtype)
    b = torch.randn(hd, v, device="cuda", dtype=dtype)
    return do_bench(lambda: a @ b, return_mode="median")


def bench_variant(fn, n, hd, v, dtype):
    """(median ms of forward + backward, peak memory above the inputs in GiB)."""
    from triton.testing import do_bench

    h, w, target, g1, g2 = inputs(n, hd, v, dtype)
    fwd_bwd(fn, h, w, target, g1, g2)  # warm-up / compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(lambda: fwd_bwd(fn, h, w, target, g1, g2), return_mode="median")
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    dtype = torch.bfloat16
    fns = variants(not args.no_compile)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    errs = check(fns, dtype)
    print("correctness (max abs error vs fp32 eager, values and gradients, N=512 H=256 V=32000):")
    for name, err in errs.items():
        print(f"  {name}: {err:.3e}")
    n, hd, v = args.n, args.hidden, args.vocab
    mm_ms = bench_matmul(n, hd, v, dtype)
    mm_tflops = 2 * n * hd * v / mm_ms / 1e9
    print(f"\nbf16 matmul [{n}x{hd}] @ [{hd}x{v}]: {mm_ms:.2f} ms = {mm_tflops:.0f} TFLOP/s")
    useful = 6 * n * hd * v
    print(f"\nN={n} H={hd} V={v} bf16, forward + backward (logp of target and termination)")
    print("| variant | ms | TFLOP/s (6NHV) | % of matmul rate | peak mem over inputs GiB |")
    print("|---|---|---|---|---|")
    for name, fn in fns.items():
        if isinstance(fn, str):
            print(f"| {name} | {fn} | | | |")
            continue
        torch.cuda.empty_cache()
        try:
            ms, peak = bench_variant(fn, n, hd, v, dtype)
        except torch.OutOfMemoryError:
            print(f"| {name} | out of memory | | | |")
            continue
        tflops = useful / ms / 1e9
        print(
            f"| {name} | {ms:.1f} | {tflops:.0f} | {100 * tflops / mm_tflops:.0f}% | {peak:.2f} |"
        )


if __name__ == "__main__":
    main()
