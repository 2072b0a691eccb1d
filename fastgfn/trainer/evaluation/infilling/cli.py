"""``python -m fastgfn.trainer.evaluation.infilling``: story infilling on the held-out stories of a
config (paper section 4.2), every method against the reference middle sentence.

    python -m fastgfn.trainer.evaluation.infilling --config configs/infilling.yaml \\
        --model runs/infilling --sft runs/sft/model --stories 6 --samples 10 --out DIR \\
        [key=value ...]

Methods, all sampled by fastgfn's sampler at ``--temperature`` (default 1) with the config's
length limits and termination token (the middle's full stop), ``--samples`` middles per story:

- ``gfn``: the GFlowNet policy (``--model``: a run or checkpoint directory, a model
  directory, .gguf, ``smollm2``), prompted as in training, with X and Y;
- ``sft``: the SFT baseline (``--sft``, e.g. the output of ``python -m
  fastgfn.trainer.baselines.sft``), the same prompt;
- ``prompt_xy``: the base LM (the config's ``model``) with the same prompt: X and Y in it;
- ``prompt_x``: the base LM given the beginning X alone, as plain text (it continues the
  story without knowing the ending).

Metrics per sample, averaged over a story's samples, then over the stories: BLEU-4, GLEU-4 and
BERTScore F1 against the reference middle (``metrics.py``), and the infilling log-reward
``log p(z STOP | X) + log p(Y | X z STOP)`` under the base LM (the training target before
its temperature, illegal-token bias included). Writes ``table.md`` and ``results.json``
into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastgfn.trainer.sampling.policy import sample_policy

METHODS = {
    "gfn": "GFlowNet policy, prompt with X and Y",
    "sft": "SFT, prompt with X and Y",
    "prompt_xy": "base LM, prompt with X and Y",
    "prompt_x": "base LM, prompt with X only",
}
DEFAULT_CONFIG = "configs/infilling.yaml"
METRICS = ("bleu4", "gleu4", "bertscore_f1", "log_reward", "terminated", "tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgfn.trainer.evaluation.infilling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the run's config (base LM, data)")
    p.add_argument("--model", help="the GFlowNet policy: run/checkpoint/model dir, .gguf")
    p.add_argument("--sft", help="the SFT baseline's model directory")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} "
                                     "(default: every method whose model is given)")
    p.add_argument("--stories", type=int, default=0, help="held-out stories (first N; 0: all)")
    p.add_argument("--samples", type=int, default=10, help="middles per story and method")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--bertscore_model", default="auto",
                   help="all-mpnet-base-v2, all-MiniLM-L6-v2, an encoder dir, or auto")
    p.add_argument("--bertscore_layer", type=int, default=None, help="default: the last")
    p.add_argument("--allow_illegal", action="store_true",
                   help="let every method generate illegal tokens (default: suppressed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    if args.stories < 0 or args.samples < 1 or not args.temperature > 0:
        p.error("--stories must be >= 0, --samples >= 1 and --temperature > 0")
    given = {"gfn": args.model, "sft": args.sft}
    default = [m for m in METHODS if given.get(m, True)]
    args.methods = [m.strip() for m in (args.methods or ",".join(default)).split(",")
                    if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    for m, flag in (("gfn", "--model"), ("sft", "--sft")):
        if m in args.methods and not given[m]:
            p.error(f"--methods: {m} needs {flag}")
    return args


def build(args):
    """``(cfg, task, models, setup)``: the held-out stories as a ``StoryInfillingTask`` scored
    by the base LM, the model of each method, and the sampling setup."""
    from fastgfn.trainer.evaluation.continuation.methods import Setup
    from fastgfn.trainer.evaluation.loading import (
        check_vocabulary,
        evaluation_device,
        load_base,
        load_policy,
        load_run_config,
    )
    from fastgfn.trainer.tasks.infilling import StoryInfillingTask, config_stories

    cfg = load_run_config(args.config, args.overrides, "infilling")
    stories = config_stories(cfg, heldout=True)
    stories = stories[: args.stories] if args.stories else stories
    if not stories:
        raise ValueError(f"heldout_fraction: {cfg.task.heldout_fraction} holds out no story of "
                         f"{cfg.task.data_path!r}; raise it")
    device = evaluation_device(cfg)
    base, tok = load_base(cfg, device)
    models = {m: base for m in ("prompt_x", "prompt_xy")}
    for m, spec in (("gfn", args.model), ("sft", args.sft)):
        if m in args.methods:
            models[m] = load_policy(spec, cfg).to(device)
            check_vocabulary(models[m], tok, f"--{'model' if m == 'gfn' else m}", spec)
    task = StoryInfillingTask(tok, stories, base, prompt_template=cfg.task.prompt_template,
                              termination=cfg.task.termination,
                              use_fused=cfg.objective.use_fused_logprobs,
                              illegal_token_bias=cfg.task.illegal_token_bias)
    setup = Setup(args.samples, cfg.sampling.max_new_tokens, cfg.sampling.min_new_tokens,
                  task.termination_token_id, task.pad_token_id, task.illegal_token_ids(),
                  suppress=not args.allow_illegal)
    return cfg, task, models, setup


@torch.no_grad()
def sample_middles(model, prompt_ids, setup, temperature: float, generator):
    """``setup.n`` middles of one story from ``model``: ``(rows, terminated)``."""
    from fastgfn.trainer.model.loading import eval_mode

    dev = next(model.parameters()).device
    with eval_mode(model):
        r = sample_policy(model, prompt_ids.to(dev), setup.n, setup.actions(),
                          max_new_tokens=setup.max_new_tokens,
                          min_new_tokens=setup.min_new_tokens, temperatures=temperature,
                          vocab_bias=setup.vocab_bias(int(model.config.vocab_size)),
                          generator=generator)
    return r.rows(), r.terminated.tolist()


def evaluate_story(i, args, task, models, setup, bertscore) -> dict:
    """Every method on held-out story ``i``: per-sample metrics and texts by method."""
    from fastgfn.trainer.evaluation.infilling import metrics

    ref = task.reference(i).strip()
    out = {"beginning": task.stories[i].beginning, "ending": task.stories[i].ending,
           "reference": ref, "methods": {}}
    for name in args.methods:  # a method's stream depends on its name: runs can be merged
        j = list(METHODS).index(name)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 1009 * i + j)
        prompt = task.reward_prompt_tokens(i) if name == "prompt_x" else task.prompt_tokens(i)
        t0 = time.time()
        rows, terminated = sample_middles(models[name], prompt, setup, args.temperature, gen)
        seconds = time.time() - t0
        T = max(len(r) for r in rows)
        lr = task.log_rewards(i, rows, T)
        log_r = [float(lr[b, len(r)]) for b, r in enumerate(rows)]
        texts = [task.text(r).strip() for r in rows]
        bert = bertscore(ref, texts)
        samples = [{"text": t, "bleu4": metrics.bleu4(ref, t), "gleu4": metrics.gleu4(ref, t),
                    "bertscore_f1": f, "log_reward": round(v, 3), "terminated": bool(d),
                    "tokens": len(r)}
                   for t, f, v, d, r in zip(texts, bert, log_r, terminated, rows)]
        out["methods"][name] = {"generate_s": round(seconds, 3), "samples": samples}
    return out


def summarise(per_story: list[dict], methods: list[str]) -> dict:
    """Per method: each metric's mean over a story's samples, averaged over the stories, and
    the number of distinct middles over all samples."""
    summary = {}
    for name in methods:
        per = [s["methods"][name]["samples"] for s in per_story]
        row = {"label": METHODS[name]}
        for key in METRICS:
            row[key] = sum(sum(float(x[key]) for x in p) / len(p) for p in per) / len(per)
        texts = [x["text"] for p in per for x in p]
        row["distinct"], row["samples"] = len(set(texts)), len(texts)
        summary[name] = row
    return summary


def table(summary: dict, meta: dict) -> str:
    bert = f"BERTScore F1 ({meta['bertscore_model']}, layer {meta['bertscore_layer']})"
    lines = [
        f"| method | BLEU-4 | GLEU-4 | {bert} | mean log R | terminated | distinct | "
        "mean tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.values():
        lines.append(
            f"| {row['label']} | {row['bleu4']:.4f} | {row['gleu4']:.4f} | "
            f"{row['bertscore_f1']:.4f} | {row['log_reward']:.2f} | {row['terminated']:.2f} | "
            f"{row['distinct']} / {row['samples']} | {row['tokens']:.1f} |")
    lines += ["", f"{meta['stories']} held-out stories x {meta['samples']} samples, "
              f"temperature {meta['temperature']}; base LM {meta['base_model']}. BERTScore "
              "without baseline rescaling, from a sentence-transformers encoder: not comparable "
              "with the paper's (deberta-xlarge-mnli, rescaled). mean log R: log p(z STOP | X) "
              "+ log p(Y | X z STOP) under the base LM."]
    return "\n".join(lines) + "\n"


def run(args, bertscore=None) -> dict:
    """The evaluation of ``args`` (from ``parse_args``); returns the output paths."""
    from fastgfn.trainer.evaluation.infilling.metrics import BertScore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    cfg, task, models, setup = build(args)
    bertscore = bertscore or BertScore(args.bertscore_model, args.bertscore_layer)
    per_story = []
    n = task.num_prompts()
    for i in range(n):
        per_story.append(evaluate_story(i, args, task, models, setup, bertscore))
        print(f"evaluation.infilling: story {i + 1}/{n} ({time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
    meta = {
        "policy": args.model, "sft": args.sft, "base_model": cfg.model.name,
        "config": str(args.config),
        "overrides": args.overrides, "stories": n, "samples": args.samples,
        "temperature": args.temperature, "max_new_tokens": cfg.sampling.max_new_tokens,
        "min_new_tokens": cfg.sampling.min_new_tokens, "termination": cfg.task.termination,
        "suppress_illegal": setup.suppress, "bertscore_model": getattr(bertscore, "name", "?"),
        "bertscore_layer": getattr(bertscore, "layer", None), "seed": args.seed,
        "heldout_fraction": cfg.task.heldout_fraction, "heldout_seed": cfg.task.heldout_seed,
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - start, 1),
    }
    summary = summarise(per_story, args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(summary, meta)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "stories": per_story}, indent=1))
    print(text)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} in {meta['wall_s']} s")
    return {"table": out / "table.md", "results": out / "results.json"}


def main(argv=None) -> None:
    run(parse_args(argv))
