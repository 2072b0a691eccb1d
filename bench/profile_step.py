"""Where a fastgfn training step's forward and backward time goes (bench_step's workload).

The step of ``bench_step.py`` (SmolLM2-135M, one shared prompt, batch 16, 30 new tokens,
full-parameter): after one warm-up step, each timed repetition splits the policy's
teacher-forced pass and its backward into

- ``body``: the decoder over the prompt (once) and the B*T tokens, up to the final hidden
  states ``h [B, T+1, H]``;
- ``head``: the fused lm_head log-prob op on ``h`` and the SubTB loss.

The backward is split where its gradient reaches ``h`` (a tensor hook reads the clock there):
``head`` backward before, ``body`` backward after. Then one repetition runs under
``torch.profiler`` and the table of operators by self CPU time is printed for the forward
and for the backward, so the largest cost is named, not guessed. ``--mixed_precision bf16``
runs the forward under ``torch.autocast(bfloat16)`` as the engine does.

    python bench/profile_step.py [--reps 3] [--batch 16] [--tokens 30] [--threads 2]
        [--mixed_precision no|bf16] [--malloc_reuse 1|0] [--top 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_step import PROMPT  # noqa: E402


def setup(args):
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model.loading import load_model
    from fastgfn.trainer.sampling.sampler import sample
    from fastgfn.trainer.scoring import frozen_prefix_logrewards

    torch.manual_seed(0)
    policy, tok = load_model(load_config(None, [f"model={args.model}"]))
    reward_model = copy.deepcopy(policy).eval().requires_grad_(False)
    prompt = torch.tensor(tok.encode(PROMPT, add_special_tokens=False))
    term = tok.encode(".", add_special_tokens=False)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rollout = sample(policy, prompt, args.batch, max_new_tokens=args.tokens,
                         min_new_tokens=args.tokens, termination_token_id=term, generator=gen)
    # the frozen model's rewards of this fixed batch: the same for every pass, not timed
    log_r = frozen_prefix_logrewards(reward_model, prompt, rollout.tokens, term)
    return policy, prompt, term, rollout, log_r


def forward(policy, prompt, term, rollout, log_r, on_hidden=None):
    """The policy's teacher-forced pass and SubTB loss; ``on_hidden(h)`` runs between the
    decoder body and the head."""
    import fastgfn
    from fastgfn.lm_logprobs import gfn_logprobs_from_hidden
    from fastgfn.trainer.scoring import hidden_states

    h = hidden_states(policy, prompt, rollout.tokens)
    if on_hidden is not None:
        on_hidden(h)
    log_pf, log_pterm = gfn_logprobs_from_hidden(policy, h, rollout.tokens, term)
    return fastgfn.subtb_loss(log_pf, log_pterm, log_r, rollout.lengths)


def one_pass(policy, prompt, term, rollout, log_r, precision, clock=None):
    """Forward and backward of the policy's loss; ``clock`` (a dict) receives the phases."""
    policy.train()
    marks = {}

    def split(h):  # the body's end in the forward, the head's end in the backward
        marks["h"] = time.perf_counter()
        h.register_hook(lambda g: marks.__setitem__("grad_h", time.perf_counter()))

    t0 = time.perf_counter()
    with precision():
        loss = forward(policy, prompt, term, rollout, log_r, split)
    t1 = marks["h"]
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    policy.zero_grad(set_to_none=True)
    if clock is not None:
        for name, value in (("forward body", t1 - t0), ("forward head+loss", t2 - t1),
                            ("backward head+loss", marks["grad_h"] - t2),
                            ("backward body", t3 - marks["grad_h"]),
                            ("forward", t2 - t0), ("backward", t3 - t2)):
            clock.setdefault(name, []).append(value)
    return float(loss.detach())


def profile_table(policy, prompt, term, rollout, log_r, precision, top):
    """Operator tables (self CPU time) of one forward and one backward, separately."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with (profile(activities=[ProfilerActivity.CPU]) as fwd_prof, record_function("forward"),
          precision()):
        loss = forward(policy, prompt, term, rollout, log_r)
    with profile(activities=[ProfilerActivity.CPU]) as bwd_prof:
        loss.backward()
    policy.zero_grad(set_to_none=True)
    tables = {}
    for name, prof in (("forward", fwd_prof), ("backward", bwd_prof)):
        rows = []
        for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
            rows.append({"op": ev.key, "calls": ev.count,
                         "self_s": ev.self_cpu_time_total / 1e6,
                         "total_s": ev.cpu_time_total / 1e6})
        tables[name] = rows
    return tables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--malloc_reuse", type=int, choices=(0, 1), default=1,
                    help="glibc keeps freed memory, as the engine's run.malloc_reuse (default 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for key in ("reps", "batch", "tokens", "threads", "top"):
        if getattr(args, key) < 1:
            ap.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    from fastgfn.trainer.model.precision import autocast
    from fastgfn.trainer.reporting.machine import describe_machine, machine_line

    torch.set_num_threads(args.threads)
    if args.malloc_reuse:
        from fastgfn.trainer.engines.host_memory import keep_freed_memory

        why_not = keep_freed_memory()
        if why_not is not None:
            print(f"malloc_reuse: left off ({why_not})")
    machine = describe_machine()
    print("machine:", machine_line(machine), flush=True)

    def precision():
        return autocast(args.mixed_precision, "cpu")

    state = setup(args)
    one_pass(*state, precision)  # warm-up
    clock = {}
    for _ in range(args.reps):
        one_pass(*state, precision, clock)
    median = {k: sorted(v)[len(v) // 2] for k, v in clock.items()}
    print(f"phases (median of {args.reps}, s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in median.items()), flush=True)
    print(f"backward / forward: {median['backward'] / median['forward']:.2f}", flush=True)
    tables = profile_table(*state, precision, args.top)
    for name, rows in tables.items():
        total = sum(r["self_s"] for r in rows)
        print(f"\n{name}: top {len(rows)} operators by self CPU time ({total:.3f} s of them)")
        for r in rows:
            print(f"  {r['self_s']:8.3f} s  {r['calls']:6d}x  {r['op']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine,
                                               "phases_s": clock, "median_s": median,
                                               "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
