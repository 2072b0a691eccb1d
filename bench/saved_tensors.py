"""What the teacher-forced pass with gradient keeps for the backward, by module and dtype.

Runs bench_step's workload (SmolLM2-135M, one shared prompt, batch 16, 30 sampled tokens)
through ``fastgfn.trainer.scoring.gfn_logprobs`` once, with a saved-tensor hook that records
every distinct storage autograd keeps (the weights themselves excluded) and the module whose
forward was running when it was saved; prints the total and the largest groups. ``--precision
bf16`` runs the pass under autocast as ``mixed_precision: bf16`` does; ``FASTGFN_LEAN_LAYERS=0``
in the environment runs transformers' layers instead of the lean ones.

    python bench/saved_tensors.py [--precision no|bf16] [--model smollm2|tiny] [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_step import PROMPT  # noqa: E402


def saved_by_module(policy, prompt, tokens, term, precision: str):
    """{(module, dtype, shape): [bytes, count]} of what the pass keeps for the backward."""
    from fastgfn.trainer.model.precision import autocast
    from fastgfn.trainer.scoring import gfn_logprobs

    running = []
    handles = []
    for name, module in policy.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: running.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: (running.pop(), None)[1]))
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            where = re.sub(r"\.\d+\.", ".N.", running[-1] if running else "<top>")
            seen[key] = (where, str(t.dtype).replace("torch.", ""),
                         t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    policy.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                autocast(precision, "cpu"):
            gfn_logprobs(policy, prompt, tokens, term)
    finally:
        for h in handles:
            h.remove()
    groups = collections.defaultdict(lambda: [0, 0])
    for where, dtype, nbytes, shape in seen.values():
        groups[(where, dtype, shape)][0] += nbytes
        groups[(where, dtype, shape)][1] += 1
    return groups


def main(argv=None):
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model import lean_modules
    from fastgfn.trainer.model.loading import load_model
    from fastgfn.trainer.sampling.sampler import sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    policy, tok = load_model(load_config(None, [f"model={args.model}"]))
    prompt = torch.tensor(tok.encode(PROMPT, add_special_tokens=False))
    term = tok.encode(".", add_special_tokens=False)[0]
    with torch.no_grad():
        r = sample(policy, prompt, args.batch, max_new_tokens=args.tokens,
                   min_new_tokens=args.tokens, termination_token_id=term,
                   generator=torch.Generator().manual_seed(0))
    groups = saved_by_module(policy, prompt, r.tokens, term, args.precision)
    total = sum(v[0] for v in groups.values())
    layers = "lean" if lean_modules.enabled() and lean_modules.lean_forwards(policy) else \
        "transformers'"
    print(f"{args.model}, batch {args.batch}, {args.tokens} tokens, precision {args.precision}, "
          f"{layers} layers: {total / 2**20:.1f} MB kept for the backward in "
          f"{sum(v[1] for v in groups.values())} tensors")
    for (where, dtype, shape), (nbytes, count) in sorted(groups.items(),
                                                         key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{nbytes / 2**20:8.1f} MB  x{count:<3d} {where:42s} {dtype:9s} {shape}")


if __name__ == "__main__":
    main()
