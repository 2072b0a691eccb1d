"""End-to-end GFlowNet training step: fastgfn vs the paper's step, same model, same batch.

fastgfn step: sample with no gradient (shared-prompt KV cache) -> frozen reward pass through
the fused log-prob op -> one teacher-forced policy pass with gradient through the fused op ->
fused SubTB loss -> backward -> AdamW step.

Paper-style step (re-implemented here from the paper's description): sample token by token
*with* gradients through the KV-cached sampling loop, every row running the whole prompt,
log-softmax materialised over the full vocabulary at every step; frozen reward pass with a
materialised log-softmax; SubTB as a Python loop over sub-trajectory lengths; backward;
AdamW step.

Workload: SmolLM2-135M-Instruct (full-parameter), one prompt shared by the batch, batch 16,
exactly 30 new tokens per row (termination forbidden before 30 so both methods do the same
work), reward = frozen initial model's log-likelihood of every prefix followed by ".".
Each method runs in its own subprocess; peak memory is the peak RSS during the timed steps
(the kernel's high-water mark, reset before them) minus the RSS after setup (model, frozen
copy, AdamW states and, for fastgfn, the sampling replica already allocated).

    python bench/bench_step.py [--steps 3] [--batch 16] [--tokens 30] [--model smollm2|tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = (
    "The cat sat on the mat and looked out of the window at the birds in the garden. "
    "It was a quiet afternoon, and"
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class PeakRSS:
    """Peak RSS inside the block. Where the kernel allows it, its own high-water mark is reset
    on entry (``/proc/self/clear_refs``) and read on exit: exact, and no polling thread to
    take the GIL from the timed code. Otherwise a thread samples the RSS every ``interval``."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop, self._t = interval, 0, False, None

    def __enter__(self):
        self.peak = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.polling = False
        except OSError:
            self.polling = True
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop = True
        if self._t is not None:
            self._t.join()
        self.peak = max(self.peak, rss_bytes())
        if not self.polling:
            self.peak = max(self.peak, _vm_hwm_bytes())


def trim():
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# the paper-style step


def subtb_python_loop(log_pf, log_pterm, log_r, lengths, lam=1.0):
    """SubTB as the paper computes it: prefix sums, then a Python loop over lengths."""
    from bench.bench_subtb import paper_loop_subtb

    return paper_loop_subtb(log_pf, log_pterm, log_r, lengths, lam)


def paper_step(policy, reward_model, opt, prompt, B, T, term, gen):
    from fastgfn.trainer.kv_cache import cache_kwarg, output_cache

    kw = cache_kwarg(policy)
    ids = prompt[None].expand(B, -1).contiguous()
    out = policy(input_ids=ids, use_cache=True)  # with gradient, whole prompt per row
    cache = output_cache(out)
    logits = out.logits[:, -1]
    log_pf, log_pterm, toks = [], [], []
    for t in range(T + 1):
        logp = torch.log_softmax(logits.float(), -1)  # materialised [B, V] with grad
        log_pterm.append(logp[:, term])
        if t == T:
            break
        z = logp.detach().clone()
        z[:, term] = float("-inf")  # exactly T tokens
        nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
        log_pf.append(logp.gather(1, nxt[:, None]).squeeze(1))
        toks.append(nxt)
        out = policy(input_ids=nxt[:, None], use_cache=True, **{kw: cache})
        cache = output_cache(out)
        logits = out.logits[:, -1]
    log_pf, log_pterm = torch.stack(log_pf, 1), torch.stack(log_pterm, 1)
    tokens = torch.stack(toks, 1)
    with torch.no_grad():
        full = torch.cat([ids, tokens], 1)
        logp = torch.log_softmax(reward_model(input_ids=full).logits.float(), -1)
        logp = logp[:, prompt.numel() - 1 :]
        r_tok = logp[:, :T].gather(2, tokens[..., None]).squeeze(2)
        log_r = torch.cat([r_tok.new_zeros(B, 1), r_tok.cumsum(1)], 1) + logp[:, :, term]
    lengths = torch.full((B,), T, dtype=torch.long)
    loss = subtb_python_loop(log_pf, log_pterm, log_r, lengths)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def fastgfn_step(policy, reward_model, opt, prompt, B, T, term, gen, replica=None, phases=None):
    """One fastgfn step; ``phases`` (a dict of lists), when given, receives each phase's
    seconds (clock reads only, no synchronisation added)."""
    import fastgfn
    from fastgfn.trainer.sampling.sampler import sample
    from fastgfn.trainer.scoring import frozen_prefix_logrewards, gfn_logprobs

    clock = [time.perf_counter()]

    def lap(name):
        clock.append(time.perf_counter())
        if phases is not None:
            phases.setdefault(name, []).append(clock[-1] - clock[-2])

    policy.eval()
    behaviour = policy if replica is None else replica.sync(policy)  # sync is timed too
    lap("sync")
    r = sample(
        behaviour,
        prompt,
        B,
        max_new_tokens=T,
        min_new_tokens=T,
        termination_token_id=term,
        generator=gen,
    )
    policy.train()
    lap("sample")
    log_r = frozen_prefix_logrewards(reward_model, prompt, r.tokens, term)
    lap("reward")
    log_pf, log_pterm = gfn_logprobs(policy, prompt, r.tokens, term)
    loss = fastgfn.subtb_loss(log_pf, log_pterm, log_r, r.lengths)
    lap("forward")
    loss.backward()
    lap("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    lap("adamw")
    return float(loss)


def worker(method: str, args) -> dict:
    from fastgfn.trainer import load_config
    from fastgfn.trainer.models import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model={args.model}"])
    policy, tok = load_model(cfg)
    reward_model = copy.deepcopy(policy).eval().requires_grad_(False)
    prompt = torch.tensor(tok.encode(PROMPT, add_special_tokens=False))
    term = tok.encode(".", add_special_tokens=False)[0]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)  # as the engine
    for p in policy.parameters():  # allocate the AdamW states before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if method == "paper":
        step = paper_step
    else:
        from fastgfn.trainer.sampling.replica import SamplingReplica

        replica = None
        if args.sample_dtype != "model":
            replica = SamplingReplica(
                policy, getattr(torch, args.sample_dtype), compile=args.compile_sampler,
                batch_hint=args.batch, max_new_tokens=args.tokens,
            )

        def step(*a):
            return fastgfn_step(*a, replica=replica, phases=phases)
    phases = {}
    gen = torch.Generator().manual_seed(0)
    trim()
    base = rss_bytes()
    times = []
    with PeakRSS() as peak:
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step(policy, reward_model, opt, prompt, args.batch, args.tokens, term, gen)
            times.append(time.perf_counter() - t0)
    times = times[args.warmup :]
    phase_medians = {
        name: sorted(v[args.warmup :])[len(v[args.warmup :]) // 2] for name, v in phases.items()
    }
    return {
        "phase_s_median": phase_medians,
        "method": method,
        "step_s_median": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "peak_step_mb": (peak.peak - base) / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "prompt_tokens": prompt.numel(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sample_dtype", default="bfloat16",
                    help="fastgfn's behaviour policy: 'model' or a low-precision replica dtype")
    ap.add_argument("--compile_sampler", type=int, default=0,
                    help="1: torch.compile the sampling replica (compiles during warm-up)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--worker", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    results = {}
    for method in ("paper", "fastgfn"):
        cmd = [sys.executable, __file__, "--worker", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "json")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
        results[method] = res
        print(
            f"{method:8s} step {res['step_s_median']:.2f} s (median of {args.steps}), "
            f"peak step memory {res['peak_step_mb']:.0f} MB, peak RSS {res['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        if res["phase_s_median"]:
            print("         phases (median s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in res["phase_s_median"].items()), flush=True)
    p, f = results["paper"], results["fastgfn"]
    speed = p["step_s_median"] / f["step_s_median"]
    mem = f["peak_step_mb"] / max(1e-9, p["peak_step_mb"])
    print(f"speed-up {speed:.2f}x (target >= 3x), step memory ratio {mem:.2f} (target <= 0.5)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), **results, "speedup": speed, "memory_ratio": mem}, indent=1
            )
        )


if __name__ == "__main__":
    main()
