"""``python -m fastgfn.trainer.evaluation.arithmetic``: exact-match accuracy of policies on the
arithmetic test sets, every rationale decoded with the calculator active.

    python -m fastgfn.trainer.evaluation.arithmetic --config configs/arithmetic.yaml \\
        --policy gflownet=runs/arith/model --policy sft=runs/arith_sft/model \\
        --policy rl=runs/arith_rl/model [--limit 50] [--k 10] [--temperature 0.1] \\
        --out runs/arith_eval [key=value ...]

The config (and ``key=value`` overrides) names the base LM (``model``), the prompt and answer
templates, the termination token, the tool, the few-shot examples and the vocabulary
constraint, as in training. The methods, each evaluated on every test set:

- ``few-shot``: the base LM with the few-shot prefix before each question, no training
  (``--no_fewshot`` leaves it out); ``zero-shot``: the base LM on the question alone
  (``--zeroshot`` adds it);
- every ``--policy LABEL=PATH``: a model directory, .gguf, ``smollm2``, a fastgfn run or
  one-process checkpoint directory; it reads the few-shot prefix when the config's
  ``fewshot_in_policy`` is true, or as ``LABEL=PATH+fewshot`` / ``LABEL=PATH+zeroshot`` says.

Test sets: ``--test NAME=FILE`` (repeatable); by default the paper's three, 3 and 4 operands
(in distribution) and 5 (out of distribution), shipped with fastgfn. ``--limit N`` takes the
first N problems of each. Per problem: one greedy rationale and ``--k`` sampled at
``--temperature`` (the paper's evaluation: 10 at 0.1, majority vote), each at most
``--max_new_tokens`` actions (default 32: a 5-operand rationale in SmolLM2's tokens is 27,
its digits and spaces being tokens of their own). Prints a table per test set and writes
``results.json`` (settings, accuracies, wall times, every rationale and answer) and
``tables.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastgfn.trainer.config_loading import PACKAGE_DIR
from fastgfn.trainer.evaluation.arithmetic.solving import solve_many
from fastgfn.trainer.reporting.machine import machine_line

DATA = PACKAGE_DIR / "data" / "gfn-lm-tuning" / "arithmetic_with_tool"
DEFAULT_TESTS = {
    "3 operands": DATA / "1digit_3_op+-_test.json",
    "4 operands": DATA / "1digit_4_op+-_test.json",
    "5 operands (OOD)": DATA / "1digit_5_op+-_test.json",
}
DEFAULT_CONFIG = "configs/arithmetic.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgfn.trainer.evaluation.arithmetic",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--policy", action="append", default=[], metavar="LABEL=PATH[+fewshot]",
                   help="a policy to evaluate (repeatable)")
    p.add_argument("--no_fewshot", action="store_true", help="leave out the few-shot baseline")
    p.add_argument("--zeroshot", action="store_true", help="add the base LM without examples")
    p.add_argument("--test", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each set (0: all)")
    p.add_argument("--k", type=int, default=10, help="sampled rationales for the majority vote")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--max_new_tokens", type=int, default=32, help="actions per rationale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_questions", type=int, default=16,
                   help="questions decoded together, (1 + k) rows each")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    if args.limit < 0 or args.k < 0 or args.max_new_tokens < 1 or args.temperature < 0 \
            or args.batch_questions < 1:
        p.error("--limit and --k must be >= 0, --max_new_tokens and --batch_questions >= 1, "
                "--temperature >= 0")
    try:
        args.policies = [parse_policy(s) for s in args.policy]
        args.tests = dict(parse_test(s) for s in args.test) or dict(DEFAULT_TESTS)
    except ValueError as exc:
        p.error(str(exc))
    if not args.policies and args.no_fewshot and not args.zeroshot:
        p.error("nothing to evaluate: give --policy, or drop --no_fewshot")
    return args


def parse_policy(spec: str) -> tuple[str, str, bool | None]:
    """``LABEL=PATH[+fewshot|+zeroshot]`` -> (label, path, few-shot prefix or None: the
    config's ``fewshot_in_policy``)."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"--policy: expected LABEL=PATH, got {spec!r}")
    fewshot = None
    for suffix, value in (("+fewshot", True), ("+zeroshot", False)):
        if path.endswith(suffix):
            path, fewshot = path[: -len(suffix)], value
    return label, path, fewshot


def parse_test(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--test: expected NAME=FILE, got {spec!r}")
    if not Path(path).is_file():
        raise ValueError(f"--test: no such file {path!r}")
    return name, Path(path)


def load_setup(args):
    """``(cfg, base model, task)``: the base LM and an arithmetic task over it (tokenizer,
    tool, vocabulary constraint, few-shot prefix)."""
    from fastgfn.trainer.evaluation.loading import load_base, load_run_config
    from fastgfn.trainer.model.reward import RewardLM
    from fastgfn.trainer.tasks import build_task

    cfg = load_run_config(args.config, args.overrides, "arithmetic").replace(eval_data_path=None)
    model, tokenizer = load_base(cfg)
    return cfg, model, build_task(cfg, tokenizer, RewardLM(model))


def methods(args, cfg, base):
    """``[(label, spec, fewshot)]`` in table order; ``spec`` is a path or the base model."""
    out = []
    if not args.no_fewshot:
        out.append(("few-shot (base LM)", base, True))
    if args.zeroshot:
        out.append(("zero-shot (base LM)", base, False))
    for label, path, fewshot in args.policies:
        out.append((label, path, cfg.task.fewshot_in_policy if fewshot is None else fewshot))
    return out


def load_examples_file(path: Path, cfg, limit: int):
    from fastgfn.trainer.tasks.data import load_examples

    opts = cfg.task
    questions, answers = load_examples(path, opts.question_key, opts.answer_key, "--test")
    n = len(questions) if limit <= 0 else min(limit, len(questions))
    return questions[:n], answers[:n]


def evaluate_method(model, task, cfg, args, questions, answers, fewshot: bool) -> dict:
    """Accuracies of one policy on one test set, and every rationale."""
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    rows, greedy_ok, vote_ok = [], 0, 0
    prompts = [task.question_prompt(q, fewshot) for q in questions]
    outs: list = [None] * len(questions)
    for group in question_batches(prompts, args.batch_questions):
        solved = solve_many(model, task, [prompts[i] for i in group], k=args.k,
                            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            min_new_tokens=cfg.sampling.min_new_tokens, generator=gen)
        for i, out in zip(group, solved):
            outs[i] = out
    for q, a, out in zip(questions, answers, outs):
        truth = int(str(a).strip())
        greedy_ok += out["greedy"] == truth
        vote_ok += out["majority"] == truth
        rows.append({"question": q, "answer": truth, **out})
    n = max(1, len(questions))
    return {
        "problems": len(questions), "greedy_accuracy": greedy_ok / n,
        "majority_accuracy": vote_ok / n if args.k else None,
        "greedy_with_answer": sum(r["greedy"] is not None for r in rows) / n,
        "seconds": time.time() - t0, "fewshot_prompt": fewshot, "rows": rows,
    }


def question_batches(prompts: list, size: int) -> list[list[int]]:
    """The questions' indices in batches of at most ``size`` whose prompts have one length."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.numel(), []).append(i)
    return [ids[j:j + size] for ids in by_length.values() for j in range(0, len(ids), size)]


def format_table(name: str, results: dict, args) -> str:
    vote = f"majority of {args.k} at T={args.temperature:g}"
    lines = [f"### {name} ({next(iter(results.values()))['problems']} problems)", "",
             f"| method | greedy | {vote} | greedy has an answer | seconds |",
             "|---|---|---|---|---|"]
    for label, r in results.items():
        maj = "n/a" if r["majority_accuracy"] is None else f"{100 * r['majority_accuracy']:.1f}"
        lines.append(f"| {label} | {100 * r['greedy_accuracy']:.1f} | {maj} | "
                     f"{100 * r['greedy_with_answer']:.0f}% | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    from fastgfn.trainer.evaluation.loading import load_policy

    cfg, base, task = load_setup(args)
    tests = {name: load_examples_file(path, cfg, args.limit) for name, path in args.tests.items()}
    results: dict = {name: {} for name in tests}
    for label, spec, fewshot in methods(args, cfg, base):
        model = spec if isinstance(spec, torch.nn.Module) else load_policy(spec, cfg)
        for name, (questions, answers) in tests.items():
            results[name][label] = evaluate_method(model, task, cfg, args, questions, answers,
                                                   fewshot)
            r = results[name][label]
            print(f"{label} on {name}: greedy {r['greedy_accuracy']:.3f}, majority "
                  f"{r['majority_accuracy']}, {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    return {"settings": settings(args, cfg), "accuracy": accuracy_summary(results),
            "results": results}


def accuracy_summary(results: dict) -> dict:
    """``{test set: {method: {"greedy": %, "majority": % or None}}}``."""
    def pct(x):
        return None if x is None else round(100 * x, 2)

    return {name: {label: {"greedy": pct(r["greedy_accuracy"]),
                           "majority": pct(r["majority_accuracy"])}
                   for label, r in per.items()} for name, per in results.items()}


def settings(args, cfg) -> dict:
    return {
        "config": args.config, "overrides": args.overrides, "model": cfg.model.name,
        "tests": {k: str(v) for k, v in args.tests.items()}, "limit": args.limit,
        "k": args.k, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "tool": cfg.task.tool, "fewshot_examples": cfg.task.fewshot_examples, "seed": args.seed,
        "policies": [list(p) for p in args.policies], "torch_threads": torch.get_num_threads(),
        "batch_questions": args.batch_questions, "machine": machine_line(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    tables = "".join(format_table(name, r, args) + "\n" for name, r in report["results"].items())
    print(tables)
    (out / "tables.md").write_text(tables)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"results: {out / 'results.json'}")
