"""SubTB loss, forward + backward: fastgfn's kernels vs the vectorised reference vs the paper's
formulation (prefix sums, then a Python loop over sub-trajectory lengths with masked squared
differences, re-implemented here).

    python -m bench.bench_subtb                 # CPU table (markdown) for bench/RESULTS.md
    python -m bench.bench_subtb --device cuda   # adds the Triton kernel on a GPU
    pytest bench/bench_subtb.py --benchmark-only   # the same cases under pytest-benchmark
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import pytest
import torch

import fastgfn


def make_batch(B: int, T: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_pf = (-torch.rand(B, T, generator=g) * 3).to(device)
    log_pterm = (-torch.rand(B, T + 1, generator=g) * 3).to(device)
    log_r = (torch.randn(B, T + 1, generator=g) * 3).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    lengths[0] = T
    return log_pf, log_pterm, log_r, lengths


def paper_loop_subtb(log_pf, log_pterm, log_r, lengths, lam):
    """The paper's formulation: per-step deltas, prefix sums, one masked term per length."""
    B, T = log_pf.shape
    steps = torch.arange(T, device=log_pf.device)[None, :]
    alive = (steps < lengths[:, None]).to(log_pf.dtype)  # mask of real steps
    delta = log_r[:, :-1] + log_pf + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]
    delta = delta * alive
    prefix = torch.cat([delta.new_zeros(B, 1), delta.cumsum(dim=1)], dim=1)
    total = delta.new_zeros(())
    weight = delta.new_zeros(())
    for length in range(1, T + 1):
        diff = prefix[:, length:] - prefix[:, :-length]
        valid = alive[:, length - 1:]  # a sub-trajectory of this length ends inside the sequence
        total = total + lam ** (length - 1) * (diff.square() * valid).sum()
        weight = weight + lam ** (length - 1) * valid.sum()
    return total / weight


def variants(device: str):
    out = {
        "paper loop (eager)": paper_loop_subtb,
        "reference (vectorised)": lambda *a: fastgfn.subtb_loss(*a, backend="reference"),
    }
    if device == "cpu":
        out["fastgfn C++"] = lambda *a: fastgfn.subtb_loss(*a, backend="cpp")
    else:
        out["fastgfn Triton"] = lambda *a: fastgfn.subtb_loss(*a, backend="triton")
    return out


def run_once(fn, inputs, lam):
    leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
    loss = fn(*leaves, inputs[3], lam)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def time_variant(fn, inputs, lam, device, min_time=0.3, max_reps=200):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run_once(fn, inputs, lam)  # warm-up
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        run_once(fn, inputs, lam)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def table(device: str, shapes, lam: float = 0.9):
    rows = []
    for B, T in shapes:
        inputs = make_batch(B, T, device)
        results = {}
        base_loss, base_grads = run_once(paper_loop_subtb, inputs, lam)
        for name, fn in variants(device).items():
            if name.startswith("reference") and B * T * T > 64 * 512 * 512:
                continue
            loss, grads = run_once(fn, inputs, lam)
            err = max([float((loss - base_loss).abs() / base_loss.abs())] +
                      [float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                       for a, b in zip(grads, base_grads)])
            results[name] = (time_variant(fn, inputs, lam, device), err)
        loop_time = results["paper loop (eager)"][0]
        for name, (t, err) in results.items():
            rows.append((B, T, name, t * 1e3, loop_time / t, err))
    return rows


def print_table(rows, device):
    cpu = platform.processor() or platform.machine()
    print(f"device={device} ({cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}), lam=0.9, forward+backward, median time")
    print("| B | T | implementation | ms | speed-up vs loop | max rel. diff vs loop |")
    print("|---|---|---|---|---|---|")
    for B, T, name, ms, speedup, err in rows:
        print(f"| {B} | {T} | {name} | {ms:.3f} | {speedup:.1f}x | {err:.1e} |")


# pytest-benchmark entry points --------------------------------------------------------------

CASES = [(8, 32), (8, 128), (8, 512), (16, 512), (64, 32), (64, 128), (64, 512)]


@pytest.mark.parametrize("B,T", CASES)
@pytest.mark.parametrize("impl", ["paper loop (eager)", "reference (vectorised)", "fastgfn C++"])
def test_subtb_cpu(benchmark, impl, B, T):
    if impl.startswith("reference") and B * T * T > 64 * 512 * 512:
        pytest.skip("the O(T^2)-memory reference is too large here")
    inputs = make_batch(B, T)
    fn = variants("cpu")[impl]
    benchmark(run_once, fn, inputs, 0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print_table(table(args.device, CASES), args.device)


if __name__ == "__main__":
    main()
