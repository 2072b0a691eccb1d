"""CPU benchmark: fused lm_head + per-token log-probs (C++) vs eager, torch.compile and
``torch.nn.functional.linear_cross_entropy``; forward + backward, fp32 or bf16 inputs
(``--dtype bf16``: every variant gets bf16 hidden states and weight; the fused op accumulates
in fp32, the others run PyTorch's own bf16 maths; ``FASTGFN_CPU_BF16_GEMM=0|mkl|avx512_bf16``
picks how the fused op's bf16 products run, kernels/cpu/bf16_gemm.h).

Each variant runs in its own subprocess so that its peak memory (RSS high-water mark,
``ru_maxrss``) is measured, not estimated. Reported: the best wall time per forward+backward
over reps x interleaved rounds (so that a shared machine's load hits all variants alike), peak
RSS, and peak RSS above the baseline (RSS after a tiny warm-up call of the same variant and
after allocating the inputs and upstream gradients: what remains is the variant's own data).

Every variant computes, for N tokens, the log-prob of the target token and of the
termination token at every row, and the gradients w.r.t. hidden and the lm_head weight for
random upstream gradients on both outputs. Correctness of each variant is checked against the
fused op on a small shape first.

    .venv/bin/python -m bench.bench_linear_logprobs_cpu                # N=4096 H=576 V=49152
    .venv/bin/python -m bench.bench_linear_logprobs_cpu --n 1024 --reps 2
    .venv/bin/python -m bench.bench_linear_logprobs_cpu --dtype bf16 --variants fastgfn_cpp,eager
    .venv/bin/python -m bench.bench_linear_logprobs_cpu --floor   # 4 GEMMs at the MKL tile rate
    .venv/bin/python -m pytest bench/bench_linear_logprobs_cpu.py --benchmark-only  # small shape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ["fastgfn_cpp", "eager", "compiled", "linear_cross_entropy"]
TERM = 2  # the termination token id
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_step(variant: str):
    """A function (h, w, target, g_logp, g_term) -> (dh, dw) doing forward + backward."""
    import torch
    import torch.nn.functional as F

    import fastgfn

    if variant == "fastgfn_cpp":

        def step(h, w, target, g1, g2):
            out = fastgfn.linear_token_logprobs(h, w, target, extra_ids=[TERM], backend="cpp")
            torch.autograd.backward([out.logp, out.extra[:, 0]], [g1, g2])

        return step

    def eager(h, w, target, g1, g2):
        logits = h @ w.T
        lsm = torch.log_softmax(logits, dim=-1)
        logp = lsm.gather(1, target[:, None]).squeeze(1)
        term = lsm.gather(1, torch.full_like(target, TERM)[:, None]).squeeze(1)
        return logp, term

    if variant == "eager":
        fwd = eager
    elif variant == "compiled":
        fwd = torch.compile(eager)
    elif variant == "linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            return None

        def fwd(h, w, target, g1, g2):
            logp = -F.linear_cross_entropy(h, w, target, reduction="none")
            term = -F.linear_cross_entropy(h, w, torch.full_like(target, TERM), reduction="none")
            return logp, term
    else:
        raise ValueError(variant)

    def step(h, w, target, g1, g2):
        logp, term = fwd(h, w, target, g1, g2)
        torch.autograd.backward([logp, term], [g1.to(logp.dtype), g2.to(term.dtype)])

    return step


def run_variant(
    variant: str, n: int, hdim: int, vocab: int, reps: int, threads: int, dtype: str = "fp32"
) -> dict:
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, DTYPES[dtype])
    step = make_step(variant)
    if step is None:
        return {"variant": variant, "skipped": "not available in this torch"}
    g = torch.Generator().manual_seed(0)
    # Warm up on a tiny shape first, so that the baseline already includes the pages of the
    # libraries every variant touches (MKL kernels, OpenMP pools): what remains is data.
    th = torch.randn(8, hdim, generator=g).to(dt).requires_grad_()
    tw = torch.randn(64, hdim, generator=g).to(dt).requires_grad_()
    step(th, tw, torch.randint(0, 64, (8,), generator=g), torch.randn(8), torch.randn(8))
    h = torch.randn(n, hdim, generator=g).to(dt).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(dt).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=g)
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    base = _rss_mb()
    times = []
    for i in range(reps + 1):  # the first run warms up (and compiles)
        h.grad = w.grad = None
        t0 = time.perf_counter()
        step(h, w, target, g1, g2)
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "ms": 1e3 * min(times),
        "ms_median": 1e3 * statistics.median(times),
        "peak_rss_mb": _peak_mb(),
        "peak_over_inputs_mb": _peak_mb() - base,
        "baseline_rss_mb": base,
    }


def gemm_floor(n: int, hdim: int, vocab: int, threads: int) -> dict:
    """The matmul time any exact fused op must spend here: without the [N, V] logits it does
    4 GEMMs of 2 N H V flops (logits forward, logits again in the backward, dh, dW) where
    eager does 3. Measured as the single-thread MKL rate of one 256 x 576 x 512 tile product
    (the kernel's tile) times ``threads``."""
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, hdim, generator=g), torch.randn(512, hdim, generator=g)
    out = torch.empty(256, 512)
    for _ in range(20):
        torch.mm(a, b.T, out=out)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(50):
            torch.mm(a, b.T, out=out)
        times.append((time.perf_counter() - t0) / 50)
    gflops = 2 * 256 * hdim * 512 / statistics.median(times) / 1e9
    one = 2 * n * hdim * vocab / (gflops * 1e9 * threads) * 1e3
    return {"tile_gflops_per_thread": gflops, "one_gemm_ms": one, "fused_floor_ms": 4 * one,
            "eager_gemms_ms": 3 * one}


def check_correctness(dtype: str = "fp32", variants=VARIANTS) -> dict:
    """Max abs error of every variant's gradients (and of the fused op's values) against
    float64 on a small shape, inputs rounded to ``dtype``."""
    import torch

    import fastgfn

    g = torch.Generator().manual_seed(1)
    n, hdim, vocab = 64, 32, 3000
    dt = getattr(torch, DTYPES[dtype])
    h0 = torch.randn(n, hdim, generator=g).to(dt)
    w0 = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(dt)
    target = torch.randint(0, vocab, (n,), generator=g)
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    errs = {}
    exact = make_step("eager")
    h, w = h0.double().requires_grad_(), w0.double().requires_grad_()
    exact(h, w, target, g1.double(), g2.double())
    ref = (h.grad, w.grad)
    for variant in variants:
        step = make_step(variant)
        if step is None:
            continue
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        step(h, w, target, g1, g2)
        errs[variant] = max(
            float((h.grad.double() - ref[0]).abs().max()),
            float((w.grad.double() - ref[1]).abs().max()),
        )
    out = fastgfn.linear_token_logprobs(h0, w0, target, extra_ids=[TERM], backend="cpp")
    lsm = torch.log_softmax(h0.double() @ w0.double().T, -1)
    errs["fused values"] = float((out.logp.double() - lsm[torch.arange(n), target]).abs().max())
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved rounds over the variants (a shared machine's load then "
        "hits every variant alike); the best run and the median of the rounds' medians "
        "of each are reported",
    )
    ap.add_argument("--floor", action="store_true",
                    help="only print the matmul floor of a fused op at this shape")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        print(json.dumps(gemm_floor(args.n, args.hidden, args.vocab, args.threads)))
        return
    if args.worker:
        res = run_variant(
            args.worker, args.n, args.hidden, args.vocab, args.reps, args.threads, args.dtype
        )
        print("RESULT " + json.dumps(res), flush=True)
        return
    variants = args.variants.split(",")
    print(
        "correctness (max abs error vs float64 of the gradients, and of the fused values):",
        json.dumps(check_correctness(args.dtype, variants)),
        flush=True,
    )
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for variant in variants:
            cmd = [
                sys.executable,
                "-m",
                "bench.bench_linear_logprobs_cpu",
                "--worker",
                variant,
                "--n",
                str(args.n),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
                "--dtype",
                args.dtype,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{variant}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(line[0][7:])
            print(json.dumps(res), flush=True)
            runs.setdefault(variant, []).append(res)
    rows = [_summary(results) for results in runs.values()]
    eager = next((r for r in rows if r["variant"] == "eager" and "ms" in r), None)
    print(
        f"\nN={args.n} H={args.hidden} V={args.vocab} {args.dtype}, threads={args.threads}, "
        f"best of {args.reps} runs x {args.rounds} interleaved rounds"
    )
    print(
        "| variant | median ms (fwd+bwd) | median vs eager | best ms | best vs eager | "
        "peak RSS MiB | peak over baseline MiB | memory vs eager |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['variant']} | {r.get('skipped', 'failed')} | | | | | | |")
            continue
        med = f"{r['ms_median'] / eager['ms_median']:.2f}x" if eager else "-"
        best = f"{r['ms'] / eager['ms']:.2f}x" if eager else "-"
        mem = (
            f"{eager['peak_over_inputs_mb'] / max(r['peak_over_inputs_mb'], 1e-9):.1f}x lower"
            if eager
            else "-"
        )
        print(
            f"| {r['variant']} | {r['ms_median']:.0f} | {med} | {r['ms']:.0f} | {best} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_over_inputs_mb']:.0f} | {mem} |"
        )


def _summary(results: list[dict]) -> dict:
    """One row per variant over the rounds: the best time, the median of every round's
    median, and the largest peak memory."""
    timed = [r for r in results if "ms" in r]
    if not timed:
        return results[0]
    return {
        "variant": timed[0]["variant"],
        "ms": min(r["ms"] for r in timed),
        "ms_median": statistics.median(r["ms_median"] for r in timed),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in timed),
        "peak_over_inputs_mb": max(r["peak_over_inputs_mb"] for r in timed),
    }


# pytest-benchmark entry point (a small shape; memory is only measured by the script) ---------


def _pytest_case(variant):
    import torch

    step = make_step(variant)
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 512, 576, 8192
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).requires_grad_()
    target = torch.randint(0, vocab, (n,), generator=g)
    return step, (h, w, target, torch.randn(n, generator=g), torch.randn(n, generator=g))


try:
    import pytest

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_linear_logprobs_cpu(benchmark, variant):
        step, args = _pytest_case(variant)
        if step is None:
            pytest.skip("not available in this torch")
        benchmark(step, *args)

except ImportError:  # the script runs without pytest
    pass


if __name__ == "__main__":
    main()
