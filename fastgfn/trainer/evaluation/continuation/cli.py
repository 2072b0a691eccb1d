"""``python -m fastgfn.trainer.evaluation.continuation``: a trained model against decoding
baselines of the base LM on the held-out continuation prompts (paper section 4.1).

    python -m fastgfn.trainer.evaluation.continuation --model runs/continuation/model \\
        [--config configs/continuation.yaml] [--prompts 50] [--samples 20] --out DIR \\
        [key=value ...]

The config (and ``key=value`` overrides) names the base LM (``model``, the frozen reward LM
of training), the prompts file and its held-out split (``heldout_fraction``,
``heldout_seed``), the termination token, the length limits and the illegal-token bias.
``--model`` is the policy: any causal LM directory, .gguf, ``smollm2``, a fastgfn run or
checkpoint directory, or ``base`` (the base LM itself). Writes ``table.md``,
``results.json`` and ``ll_vs_diversity.png`` into ``--out``. Nothing is fetched from a hub.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fastgfn.trainer.evaluation.continuation import metrics
from fastgfn.trainer.evaluation.continuation.methods import METHODS, Setup, run_method

DEFAULT_CONFIG = "configs/continuation.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgfn.trainer.evaluation.continuation",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="the policy: model dir, .gguf, smollm2, run/checkpoint dir, or 'base'")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the run's config (base LM, data)")
    p.add_argument("--prompts", type=int, default=50, help="held-out prompts (the first N)")
    p.add_argument("--samples", type=int, default=20, help="samples per prompt and method")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--embedder", default="auto",
                   help="all-mpnet-base-v2, all-MiniLM-L6-v2, a sentence-transformers dir, "
                        "or auto (mpnet when installed)")
    p.add_argument("--diversity_penalty", type=float, default=1.0)
    p.add_argument("--allow_illegal", action="store_true",
                   help="let every method generate illegal tokens (default: suppressed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.samples < 1:
        p.error("--prompts and --samples must be >= 1")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    return args


def build(args):
    """``(cfg, base, policy, tokenizer, tasks, setup)`` for the evaluation."""
    from fastgfn.trainer.evaluation.loading import (
        check_vocabulary,
        evaluation_device,
        load_base,
        load_policy,
        load_run_config,
    )
    from fastgfn.trainer.tasks.continuation import ContinuationTask, heldout_prompts

    cfg = load_run_config(args.config, args.overrides, "continuation")
    prompts = heldout_prompts(cfg)[: args.prompts]
    if not prompts:
        raise ValueError(f"heldout_fraction: {cfg.task.heldout_fraction} holds out no prompt of "
                         f"{cfg.task.data_path!r}; raise it")
    device = evaluation_device(cfg)
    base, tok = load_base(cfg, device)
    policy = base if args.model in ("base", cfg.model.name) else load_policy(args.model, cfg)
    policy = policy.to(device)
    check_vocabulary(policy, tok, "--model", args.model)
    kw = dict(termination=cfg.task.termination, use_fused=cfg.objective.use_fused_logprobs)
    task = ContinuationTask(tok, prompts, base, illegal_token_bias=cfg.task.illegal_token_bias,
                            **kw)
    plain = ContinuationTask(tok, prompts, base, illegal_token_bias=0.0, **kw)
    setup = Setup(args.samples, cfg.sampling.max_new_tokens, cfg.sampling.min_new_tokens,
                  task.termination_token_id, task.pad_token_id, task.illegal_token_ids(),
                  suppress=not args.allow_illegal, diversity_penalty=args.diversity_penalty)
    return cfg, base, policy, tok, (task, plain), setup


def evaluate_prompt(i, methods, policy, base, tasks, setup, embedder, seed) -> dict:
    """Every method on held-out prompt ``i``: metrics and samples by method."""
    task, plain = tasks
    out = {"prompt": task.prompts[i], "methods": {}}
    for j, name in enumerate(methods):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1009 * i + j)
        t0 = time.time()
        s = run_method(name, policy, base, task.prompt_tokens(i), setup, gen)
        seconds = time.time() - t0
        ll = metrics.sample_log_likelihoods(task, i, s.rows)
        ll_plain = metrics.sample_log_likelihoods(plain, i, s.rows)
        texts = [task.text(r) for r in s.rows]
        div = metrics.diversity(embedder(texts)) if len(texts) > 1 else None
        m = metrics.prompt_metrics(ll, ll_plain, div, s.rows, s.terminated)
        m["generate_s"] = round(seconds, 3)
        m["samples_text"] = [[t, round(float(v), 3)] for t, v in zip(texts, ll)]
        out["methods"][name] = m
    return out


def summarise(per_prompt: list[dict], methods: list[str], samples: int) -> dict:
    summary = {}
    for name in methods:
        rows = [{k: v for k, v in p["methods"][name].items() if k != "samples_text"}
                for p in per_prompt]
        label = METHODS[name]
        if name in ("beam", "diverse_beam"):
            label += f", {samples} beams" + (f" in {samples} groups" if name != "beam" else "")
        summary[name] = {"label": label, **metrics.average(rows)}
    return summary


def run(args, embedder=None) -> dict:
    """The evaluation of ``args`` (from ``parse_args``); returns the output paths."""
    from fastgfn.trainer.evaluation.continuation.embeddings import Embedder
    from fastgfn.trainer.evaluation.continuation.report import write_outputs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    cfg, base, policy, tok, tasks, setup = build(args)
    embedder = embedder or Embedder(args.embedder)
    per_prompt = []
    n = len(tasks[0].prompts)
    for i in range(n):
        per_prompt.append(evaluate_prompt(i, args.methods, policy, base, tasks, setup,
                                          embedder, args.seed))
        print(f"evaluation.continuation: prompt {i + 1}/{n} ({time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
    meta = {
        "policy": args.model, "base_model": cfg.model.name, "config": str(args.config),
        "overrides": args.overrides, "prompts": n, "samples": args.samples,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "min_new_tokens": cfg.sampling.min_new_tokens,
        "termination": cfg.task.termination, "illegal_token_bias": cfg.task.illegal_token_bias,
        "suppress_illegal": setup.suppress, "embedder": getattr(embedder, "name", "?"),
        "diversity_penalty": args.diversity_penalty, "seed": args.seed,
        "heldout_fraction": cfg.task.heldout_fraction, "heldout_seed": cfg.task.heldout_seed,
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - start, 1),
    }
    summary = summarise(per_prompt, args.methods, args.samples)
    paths = write_outputs(Path(args.out), summary, meta, per_prompt)
    print(Path(paths["table"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {meta['wall_s']} s")
    return paths


def main(argv=None) -> None:
    run(parse_args(argv))
