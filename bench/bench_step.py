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

Several rounds (``--rounds``) run every method once each, in turn, so a shared machine's load
falls on all of them alike; the summary pools the timed steps of all rounds. Each step and
phase is timed in wall seconds and in the process's CPU seconds (all threads), and the load
average is read before and after every worker. ``--methods`` lists what runs, each
``NAME[+OPTION...][@THREADS[p]]``: ``paper``, ``fastgfn``, ``floor`` (the matmuls of one
fastgfn step alone, see ``floor_worker``); fastgfn's option ``+infmode`` runs the frozen
reward pass under ``torch.inference_mode`` instead of ``no_grad``, and ``+bf16`` runs the step
as the engine's ``mixed_precision: bf16`` does (sampling, reward, forward and loss under
``torch.autocast(bfloat16)``, the backward outside it, fp32 weights, gradients and AdamW).
``grpo`` is TRL 1.16's ``GRPOTrainer`` step on the same workload (``bench/grpo_step.py``;
``+bf16``: its ``bf16=True``). fastgfn runs with the engine's default ``malloc_reuse``
(``engines/host_memory.py``: glibc keeps freed memory for the next step); ``+sysmalloc``
turns it off, and ``paper+reuse`` / ``grpo+reuse`` give the baselines the same setting.
``@1`` runs that method on one thread (default ``--threads``), ``@2p`` on two with
``OMP_WAIT_POLICY=PASSIVE``.
fastgfn samples as the engine does by default (``--sample_dtype auto``:
``resolve_sample_dtype``, a bf16 replica only on a CPU with native bf16 matmuls). The run
prints and records (``--json``: ``machine``) the machine it ran on, from
``fastgfn.trainer.reporting.machine``: CPU model, cores, AVX2 / AVX-512 / AVX-512 BF16 / AMX,
whether bf16 matmuls are native or emulated there, and how the fused lm_head's bf16 products
run (``mkl`` on AMX, ``avx512_bf16``, or ``off``: fp32 products).

    python bench/bench_step.py [--rounds 3] [--steps 3] [--methods paper,fastgfn,grpo,floor]
        [--batch 16] [--tokens 30] [--model smollm2|tiny] [--sample_dtype auto]
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
    from fastgfn.trainer.model.kv_cache import cache_kwarg, output_cache

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


def fastgfn_step(policy, reward_model, opt, prompt, B, T, term, gen, replica=None, phases=None,
                 options=()):
    """One fastgfn step; ``phases`` (a dict of lists), when given, receives each phase's
    (wall, CPU) seconds (clock reads only, no synchronisation added)."""
    import fastgfn
    from fastgfn.trainer.model.precision import autocast
    from fastgfn.trainer.sampling.sampler import sample
    from fastgfn.trainer.scoring import frozen_prefix_logrewards, gfn_logprobs

    clock = [(time.perf_counter(), time.process_time())]

    def lap(name):
        clock.append((time.perf_counter(), time.process_time()))
        if phases is not None:
            wall, cpu = (clock[-1][i] - clock[-2][i] for i in (0, 1))
            phases.setdefault(name, []).append((wall, cpu))

    policy.eval()
    precision = autocast("bf16" if "bf16" in options else "no", "cpu")
    with precision:  # the backward runs outside, as in the engine
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
        if "infmode" in options:
            with torch.inference_mode():
                log_r = frozen_prefix_logrewards(reward_model, prompt, r.tokens, term)
            log_r = log_r.clone()  # a normal tensor again, usable by autograd
        else:
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


# options each method takes (see the module docstring)
METHOD_OPTIONS = {
    "paper": ("reuse",),
    "fastgfn": ("infmode", "bf16", "sysmalloc"),
    "grpo": ("bf16", "reuse"),
    "floor": (),
}


def parse_method(spec: str, default_threads: int) -> tuple[str, tuple[str, ...], int]:
    """``NAME[+OPTION...][@THREADS[p]]`` -> (name, options, threads); a trailing ``p`` on the
    threads (``@2p``) runs the worker with ``OMP_WAIT_POLICY=PASSIVE`` (see ``passive``)."""
    name, _, threads = spec.partition("@")
    name, *options = name.split("+")
    threads = threads[:-1] if threads.endswith("p") else threads
    if name not in METHOD_OPTIONS:
        raise ValueError(f"--methods: unknown method {name!r} in {spec!r}")
    bad = [o for o in options if o not in METHOD_OPTIONS[name]]
    if bad:
        raise ValueError(f"--methods: {spec!r}: unknown option(s) {bad}")
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ValueError(f"--methods: {spec!r}: threads must be a positive integer")
    return name, tuple(options), int(threads) if threads else default_threads


def passive(spec: str) -> bool:
    """Whether ``spec`` asks for OpenMP threads that sleep instead of spinning while they wait
    (``@2p``): OpenMP reads ``OMP_WAIT_POLICY`` once, at start-up, so the worker's
    environment carries it."""
    return spec.partition("@")[2].endswith("p")


def load_average() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def worker(spec: str, args) -> dict:
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model.loading import load_model

    method, options, threads = parse_method(spec, args.threads)
    torch.set_num_threads(threads)
    load_before = load_average()
    if method == "floor":
        return {"method": spec, "threads": threads, "load_before": load_before,
                **floor_worker(args), "load_after": load_average()}
    malloc_reuse = "reuse" in options or (method == "fastgfn" and "sysmalloc" not in options)
    if malloc_reuse:  # as the engine does on the CPU (run.malloc_reuse, on by default)
        from fastgfn.trainer.engines.host_memory import keep_freed_memory

        why_not = keep_freed_memory()
        if why_not is not None:
            raise RuntimeError(f"{spec}: malloc reuse unavailable here: {why_not}")
    if method == "grpo":
        from bench.grpo_step import grpo_worker

        res = grpo_worker(args, options, PROMPT, PeakRSS, rss_bytes, trim)
        return {"method": spec, "threads": threads, "malloc_reuse": malloc_reuse, **res,
                "load_before": load_before, "load_after": load_average()}
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
    sample_dtype = None
    if method == "paper":
        step = paper_step
    else:
        from fastgfn.trainer.sampling.replica import SamplingReplica, resolve_sample_dtype

        sample_dtype = resolve_sample_dtype(args.sample_dtype, policy, zero_stage=0)
        replica = None
        if sample_dtype != "model":
            replica = SamplingReplica(
                policy, getattr(torch, sample_dtype), compile=args.compile_sampler,
                batch_hint=args.batch, max_new_tokens=args.tokens,
            )

        def step(*a):
            return fastgfn_step(*a, replica=replica, phases=phases, options=options)
    phases = {}
    gen = torch.Generator().manual_seed(0)
    trim()
    base = rss_bytes()
    times, cpu_times, losses = [], [], []
    with PeakRSS() as peak:
        for _ in range(args.warmup + args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step(policy, reward_model, opt, prompt, args.batch, args.tokens, term,
                               gen))
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    w = args.warmup
    return {
        "method": spec,
        "threads": threads,
        "malloc_reuse": malloc_reuse,
        "sample_dtype": sample_dtype,
        "phase_s": {name: [x[0] for x in v[w:]] for name, v in phases.items()},
        "phase_cpu_s": {name: [x[1] for x in v[w:]] for name, v in phases.items()},
        "step_s_all": times[w:],
        "step_cpu_s_all": cpu_times[w:],
        "losses": losses,
        "peak_step_mb": (peak.peak - base) / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "prompt_tokens": prompt.numel(),
        "load_before": load_before,
        "load_after": load_average(),
    }


def _linear_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of one decoder layer of a Llama-style model."""
    H, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    d = getattr(config, "head_dim", None) or H // heads
    return [(heads * d, H), (kv * d, H), (kv * d, H), (H, heads * d), (inter, H), (inter, H),
            (H, inter)]


def floor_worker(args) -> dict:
    """The matmuls of one fastgfn step and nothing else, fp32, on random tensors of the
    model's shapes (every layer its own weights): sampling (the prompt once, then batch-row
    decode steps and their lm_head), the frozen reward pass and the policy's teacher-forced
    forward (prompt + B*T tokens through the layers, the lm_head on B*(T+1) states), and the
    backward (dX and dW of every layer; the fused lm_head's recomputed logits, dh and dW).
    Attention, norms and element-wise work are left out, so this is a lower bound for the
    step at this machine's matmul rate now."""
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model.loading import load_model

    model, tok = load_model(load_config(None, [f"model={args.model}"]))
    config = model.config
    V, H, L = model.get_output_embeddings().weight.shape[0], config.hidden_size, \
        config.num_hidden_layers
    del model
    P = len(tok.encode(PROMPT, add_special_tokens=False))
    B, T = args.batch, args.tokens
    shapes = _linear_shapes(config)
    weights = [[torch.randn(o, i) * 0.02 for o, i in shapes] for _ in range(L)]
    head = torch.randn(V, H) * 0.02

    def forward(M):
        flops = 0
        for layer in weights:
            for w in layer:
                torch.mm(torch.randn(M, w.shape[1]), w.t())
                flops += 2 * M * w.numel()
        return flops

    def backward(M):
        flops = 0
        for layer in weights:
            for w in layer:
                dy, x = torch.randn(M, w.shape[0]), torch.randn(M, w.shape[1])
                torch.mm(dy, w)
                torch.mm(dy.t(), x)
                flops += 4 * M * w.numel()
        return flops

    def lm_head(M, gemms=1):
        h = torch.randn(M, H)
        for _ in range(gemms):
            torch.mm(h, head.t())
        return 2 * M * head.numel() * gemms

    def sampling():
        f = forward(P) + lm_head(1)
        for _ in range(T - 1):
            f += forward(B) + lm_head(B)
        return f

    def teacher_forced():  # the frozen reward pass, or the policy's forward: the same matmuls
        return forward(P) + forward(B * T) + lm_head(B * (T + 1))

    def grads():
        return backward(P) + backward(B * T) + lm_head(B * (T + 1), gemms=3)

    groups = {"sample": sampling, "reward": teacher_forced, "forward": teacher_forced,
              "backward": grads}
    teacher_forced()  # warm-up: first-touch of the weights, MKL's buffers
    out = {}
    for name, fn in groups.items():
        t0, c0 = time.perf_counter(), time.process_time()
        flops = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[name] = {"s": wall, "cpu_s": cpu, "gflop": flops / 1e9, "gflops": flops / wall / 1e9}
    total = sum(v["s"] for v in out.values())
    gflop = sum(v["gflop"] for v in out.values())
    return {"floor_groups": out, "floor_s": total, "floor_cpu_s":
            sum(v["cpu_s"] for v in out.values()), "floor_gflop": gflop}


def _run_worker(spec: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", spec] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "json", "methods")
    ]
    env = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if passive(spec) else {}))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])


def summarise(runs: list[dict]) -> dict:
    """Pool one method's rounds: medians of the steps and phases, memory, load range."""
    first = runs[0]
    if "floor_s" in first:
        groups = {g: _median([r["floor_groups"][g]["s"] for r in runs])
                  for g in first["floor_groups"]}
        return {"floor_s": _median([r["floor_s"] for r in runs]),
                "floor_cpu_s": _median([r["floor_cpu_s"] for r in runs]),
                "floor_gflop": first["floor_gflop"], "groups_s": groups,
                "gflops": {g: _median([r["floor_groups"][g]["gflops"] for r in runs])
                           for g in first["floor_groups"]},
                "rounds_s": [r["floor_s"] for r in runs], "threads": first["threads"]}
    pool = lambda key: [x for r in runs for x in r[key]]  # noqa: E731
    phases = {p: (_median([x for r in runs for x in r["phase_s"][p]]),
                  _median([x for r in runs for x in r["phase_cpu_s"][p]]))
              for p in first["phase_s"]}
    return {
        "step_s": _median(pool("step_s_all")), "step_cpu_s": _median(pool("step_cpu_s_all")),
        "rounds_s": [_median(r["step_s_all"]) for r in runs], "phases": phases,
        "peak_step_mb": _median([r["peak_step_mb"] for r in runs]),
        "peak_rss_mb": _median([r["peak_rss_mb"] for r in runs]),
        "threads": first["threads"], "sample_dtype": first["sample_dtype"],
        "malloc_reuse": first.get("malloc_reuse"),
        "losses": [r["losses"] for r in runs],
    }


def report(results: dict) -> None:
    for spec, res in results.items():
        if "floor_s" in res:
            print(f"{spec:22s} matmuls only {res['floor_s']:.2f} s ({res['floor_cpu_s']:.2f} CPU s)"
                  f" for {res['floor_gflop']:.0f} GFLOP; rounds "
                  + ", ".join(f"{x:.2f}" for x in res["rounds_s"]), flush=True)
            print("    groups (median s, GFLOP/s): " + ", ".join(
                f"{g} {res['groups_s'][g]:.2f} ({res['gflops'][g]:.0f})" for g in res["groups_s"]))
            continue
        print(f"{spec:22s} step {res['step_s']:.2f} s ({res['step_cpu_s']:.2f} CPU s), rounds "
              + ", ".join(f"{x:.2f}" for x in res["rounds_s"])
              + f"; step memory {res['peak_step_mb']:.0f} MB, peak RSS {res['peak_rss_mb']:.0f} MB",
              flush=True)
        if res["phases"]:
            print("    phases (median s, CPU s): " + ", ".join(
                f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in res["phases"].items()), flush=True)
    baselines = [(spec, res) for spec, res in results.items()
                 if spec.split("@")[0].split("+")[0] in ("paper", "grpo")]
    for spec, res in results.items():
        if not spec.startswith("fastgfn"):
            continue
        for base_spec, base in baselines:
            if base["threads"] != res["threads"]:
                continue
            print(f"{spec}: {base['step_s'] / res['step_s']:.2f}x faster than {base_spec} "
                  f"({base['step_cpu_s'] / res['step_cpu_s']:.2f}x in CPU time), step memory "
                  f"ratio {res['peak_step_mb'] / max(1e-9, base['peak_step_mb']):.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="paper,fastgfn,floor",
                    help="comma list of NAME[+OPTION...][@THREADS]: paper, "
                         "fastgfn[+infmode][+bf16], floor")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sample_dtype", default="auto",
                    help="fastgfn's behaviour policy: 'auto' (the engine's choice), 'model', or "
                         "a replica dtype (bfloat16, float16, float32)")
    ap.add_argument("--compile_sampler", type=int, default=0,
                    help="1: torch.compile the sampling replica (compiles during warm-up)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--worker", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    for key in ("steps", "rounds", "batch", "tokens", "threads"):
        if getattr(args, key) < 1:
            ap.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    for spec in specs:
        try:
            parse_method(spec, args.threads)
        except ValueError as exc:
            ap.error(str(exc))
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    from fastgfn.trainer.reporting.machine import describe_machine, machine_line

    machine = describe_machine()
    print("machine:", machine_line(machine), flush=True)
    if machine["bf16_matmuls"] == "emulated":
        print("machine: bf16 matmuls are emulated on this CPU (no AMX / AVX-512 BF16): the "
              "sampling replica stays fp32 and bf16 timings would not show the format's "
              "speed", flush=True)
    print("before:", uptime(), flush=True)
    runs = {spec: [] for spec in specs}
    for rnd in range(args.rounds):
        for spec in specs:
            res = _run_worker(spec, args)
            runs[spec].append(res)
            if args.json:  # after every worker, so a stopped run keeps what it measured
                Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine,
                                                       "runs": runs}))
            took = res.get("floor_s") or _median(res["step_s_all"])
            print(f"round {rnd + 1}: {spec} {took:.2f} s (load {res['load_before'][0]:.1f} -> "
                  f"{res['load_after'][0]:.1f})", flush=True)
    print("after:", uptime(), flush=True)
    results = {spec: summarise(r) for spec, r in runs.items()}
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine,
                                               "results": results, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
