"""CPU benchmark: fused lm_head + per-token log-probs (C++) vs eager, torch.compile and
``torch.nn.functional.linear_cross_entropy``; forward + backward, fp32.

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
        torch.autograd.backward([logp, term], [g1, g2])

    return step


def run_variant(variant: str, n: int, hdim: int, vocab: int, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step = make_step(variant)
    if step is None:
        return {"variant": variant, "skipped": "not available in this torch"}
    g = torch.Generator().manual_seed(0)
    # Warm up on a tiny shape first, so that the baseline already includes the pages of the
    # libraries every variant touches (MKL kernels, OpenMP pools): what remains is data.
    th = torch.randn(8, hdim, generator=g).requires_grad_()
    tw = torch.randn(64, hdim, generator=g).requires_grad_()
    step(th, tw, torch.randint(0, 64, (8,), generator=g), torch.randn(8), torch.randn(8))
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).requires_grad_()
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


def check_correctness() -> dict:
    """Every variant's gradients and the fused op's values agree on a small shape."""
    import torch

    import fastgfn

    g = torch.Generator().manual_seed(1)
    n, hdim, vocab = 64, 32, 3000
    h0 = torch.randn(n, hdim, generator=g)
    w0 = torch.randn(vocab, hdim, generator=g) / hdim**0.5
    target = torch.randint(0, vocab, (n,), generator=g)
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grads = {}
    for variant in VARIANTS:
        step = make_step(variant)
        if step is None:
            continue
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        step(h, w, target, g1, g2)
        grads[variant] = (h.grad, w.grad)
    out = fastgfn.linear_token_logprobs(h0, w0, target, extra_ids=[TERM], backend="cpp")
    lsm = torch.log_softmax(h0.double() @ w0.double().T, -1)
    errs = {"values": float((out.logp.double() - lsm[torch.arange(n), target]).abs().max())}
    ref = grads["eager"]
    for variant, (dh, dw) in grads.items():
        errs[variant] = max(float((dh - ref[0]).abs().max()), float((dw - ref[1]).abs().max()))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="interleaved rounds over the variants (a shared machine's load then "
        "hits every variant alike); the best round of each is reported",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = run_variant(args.worker, args.n, args.hidden, args.vocab, args.reps, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return
    print(
        "correctness (max abs diff of gradients vs eager; values vs float64):",
        json.dumps(check_correctness()),
        flush=True,
    )
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
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
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{variant}: failed\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(line[0][7:])
            print(json.dumps(res), flush=True)
            if variant not in best or res.get("ms", 0) < best[variant].get("ms", 0):
                best[variant] = res
    rows = list(best.values())
    eager = next((r for r in rows if r["variant"] == "eager" and "ms" in r), None)
    print(
        f"\nN={args.n} H={args.hidden} V={args.vocab} fp32, threads={args.threads}, "
        f"best of {args.reps} runs x {args.rounds} interleaved rounds"
    )
    print(
        "| variant | ms (fwd+bwd) | vs eager | peak RSS MiB | peak over inputs MiB | "
        "memory vs eager |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['variant']} | {r.get('skipped', 'failed')} | | | | |")
            continue
        speed = f"{r['ms'] / eager['ms']:.2f}x" if eager else "-"
        mem = (
            f"{eager['peak_over_inputs_mb'] / max(r['peak_over_inputs_mb'], 1e-9):.1f}x lower"
            if eager
            else "-"
        )
        print(
            f"| {r['variant']} | {r['ms']:.0f} | {speed} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_over_inputs_mb']:.0f} | {mem} |"
        )


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
