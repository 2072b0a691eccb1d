"""``python -m fastgfn.trainer.evaluation.reasoning``: accuracy on a label task (SUBJ) as the paper
evaluates it (section 4.3), every method scored the same way.

    python -m fastgfn.trainer.evaluation.reasoning --config configs/subj.yaml \\
        --train data/gfn-lm-tuning/subj/train.20.jsonl --policy gflownet=runs/subj20 \\
        [--limit 500] [--k 10] [--m_rationales 10] [--classifier_steps 100] \\
        --out runs/subj_eval20 [key=value ...]

The config (and ``key=value`` overrides) gives the base LM, the prompt and answer templates
and the termination token, as in training; the choices are the labels of the training and
test files. A context is ``X STOP`` (the empty rationale) or ``X z STOP`` (a rationale z);
a classifier predicts the choice c with the largest ``log p(Y_c | context)`` (``core.py``).
The methods:

- ``zero-shot``: the base LM on ``X STOP``;
- ``few-shot``: the base LM with every training example as a demonstration before the
  question (``X_i STOP Y_i``, one per line, in a seeded random order);
- ``SFT``: a copy of the base LM trained on the training examples' ``X STOP -> Y`` with the
  choice cross-entropy (the paper's supervised baseline);
- per ``--policy LABEL=PATH`` (a GFlowNet-fine-tuned policy, the E-step):
  ``LABEL (E-step)``, the base LM as the classifier after the policy's rationales; and
  ``LABEL + M-step``, the paper's result: a fresh copy of the base LM trained on
  ``--m_rationales`` rationales per training example drawn from the policy at temperature 1,
  ``X z STOP -> Y``, then the classifier after the policy's rationales.

Rationale methods are evaluated greedily (one rationale at temperature 0; the paper: 0.01)
and by majority vote over ``--k`` rationales at temperature 1 (ties: the first choice, as
``LatentReasoningTask.answer_accuracy``). Writes ``results.json`` (settings, machine,
accuracies, wall times, the classifiers' losses, every greedy prediction) and ``tables.md``
into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from fastgfn.trainer.evaluation.reasoning.classifier import predict, train_classifier
from fastgfn.trainer.reporting.machine import machine_line

DEFAULT_CONFIG = "configs/subj.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgfn.trainer.evaluation.reasoning",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--train", default=None, help="training examples (default: data_path)")
    p.add_argument("--test", default=None, help="test examples (default: eval_data_path)")
    p.add_argument("--policy", action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--limit", type=int, default=0, help="first N test examples (0: all)")
    p.add_argument("--k", type=int, default=10, help="rationales for the majority vote")
    p.add_argument("--m_rationales", type=int, default=10,
                   help="rationales per training example for the M-step")
    p.add_argument("--classifier_steps", type=int, default=100)
    p.add_argument("--classifier_batch", type=int, default=16)
    p.add_argument("--classifier_lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=32, help="contexts scored together")
    p.add_argument("--methods", default="zero-shot,few-shot,sft,policies",
                   help="comma list of zero-shot, few-shot, sft, policies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    if args.limit < 0 or args.k < 0 or args.m_rationales < 1 or args.classifier_steps < 0 \
            or args.classifier_batch < 1 or args.batch < 1 or not args.classifier_lr > 0:
        p.error("--limit, --k, --classifier_steps must be >= 0; --m_rationales, "
                "--classifier_batch, --batch >= 1; --classifier_lr > 0")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - {"zero-shot", "few-shot", "sft", "policies"}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}")
    try:
        args.policies = [parse_policy(s) for s in args.policy]
    except ValueError as exc:
        p.error(str(exc))
    return args


def parse_policy(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"--policy: expected LABEL=PATH, got {spec!r}")
    return label, path


class LabelData:
    """Token ids of one label task: prompts, the termination token, the choices' answer
    texts, and the examples of the training and test files."""

    def __init__(self, cfg, tokenizer, train_path, test_path, limit: int):
        from fastgfn.trainer.tasks.base import termination_token
        from fastgfn.trainer.tasks.data import load_examples
        from fastgfn.trainer.tasks.reasoning import check_templates

        check_templates(cfg.task.prompt_template, cfg.task.answer_template)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_q, self.train_a = load_examples(train_path, cfg.task.question_key,
                                                   cfg.task.answer_key, "--train")
        test_q, test_a = load_examples(test_path, cfg.task.question_key, cfg.task.answer_key,
                                       "--test")
        n = len(test_q) if limit <= 0 else min(limit, len(test_q))
        self.test_q, self.test_a = test_q[:n], test_a[:n]
        self.choices = sorted(set(self.train_a) | set(self.test_a))
        if len(self.choices) < 2:
            raise ValueError(f"--train/--test: a label task needs 2 or more labels, got "
                             f"{self.choices}")
        self.choice_ids = [self.encode(cfg.task.answer_template.format(answer=c))
                           for c in self.choices]
        self.stop = termination_token(tokenizer, cfg.task.termination)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, question: str) -> list[int]:
        return self.encode(self.cfg.task.prompt_template.format(question=question))

    def label(self, answer: str) -> int:
        return self.choices.index(answer)

    def fewshot_prefix(self, seed: int) -> list[int]:
        """Every training example as ``X_i STOP Y_i`` and a line break, in a seeded order."""
        order = torch.randperm(len(self.train_q),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        out: list[int] = []
        for i in order:
            out += self.prompt(self.train_q[i]) + [self.stop] + self.choice_ids[
                self.label(self.train_a[i])] + self.encode("\n")
        return out


def draw_rationales(policy, data: LabelData, question: str, temperatures: list[float],
                    generator, bias) -> list[list[int]]:
    """Rationales of ``question`` from ``policy``, one per temperature (0: greedy), within
    the config's length limits; each context ``X z STOP`` (a rationale that reached the
    length limit is closed with STOP, as the forced stop in training)."""
    from fastgfn.trainer.sampling.policy import PolicyActions, sample_policy

    prompt, limits = data.prompt(question), data.cfg.sampling
    actions = PolicyActions(data.stop, data.tokenizer.pad_token_id or 0, bias)
    r = sample_policy(policy, torch.tensor(prompt), len(temperatures), actions,
                      max_new_tokens=limits.max_new_tokens, min_new_tokens=limits.min_new_tokens,
                      temperatures=torch.tensor(temperatures), generator=generator)
    return [prompt + row + [data.stop] for row in r.rows()]


def vote(scores: torch.Tensor, k: int, n_choices: int) -> torch.Tensor:
    """Majority predictions of ``[n * k, C]`` scores, question by question (ties: the first
    choice)."""
    from fastgfn.trainer.tasks.reasoning import majority_vote

    return majority_vote(scores.argmax(1).view(-1, k), n_choices)


def run(args) -> dict:
    """Every method of ``args.methods`` on the test examples; the report as results.json."""
    from fastgfn.trainer.config_loading import resolve_path
    from fastgfn.trainer.evaluation.loading import load_base, load_run_config

    cfg = load_run_config(args.config, args.overrides, "reasoning")
    # on the command line: relative to the working directory, else to the package (its data)
    train_path = resolve_path(args.train, Path.cwd()) or cfg.task.data_path
    test_path = resolve_path(args.test, Path.cwd()) or cfg.task.eval_data_path
    if not test_path:
        raise SystemExit("--test: no test file (and the config has no eval_data_path)")
    base, tokenizer = load_base(cfg)
    data = LabelData(cfg, tokenizer, train_path, test_path, args.limit)
    ev = Evaluation(args, cfg, base, data)
    ev.baselines()
    if "policies" in args.methods:
        ev.policies()
    return {"settings": settings(args, cfg, data, train_path, test_path),
            "accuracy": {k: {"greedy": round(100 * r["greedy_accuracy"], 2),
                             "majority": None if r["majority_accuracy"] is None
                             else round(100 * r["majority_accuracy"], 2)}
                         for k, r in ev.results.items()},
            "results": ev.results}


class Evaluation:
    """The methods' rows on one test set: each scores the two choices after its contexts."""

    def __init__(self, args, cfg, base, data: LabelData):
        self.args, self.cfg, self.base, self.data = args, cfg, base, data
        self.pad = data.tokenizer.pad_token_id or 0
        self.test_labels = [data.label(a) for a in data.test_a]
        self.train_labels = [data.label(a) for a in data.train_a]
        self.empty = [data.prompt(q) + [data.stop] for q in data.test_q]
        self.gen = torch.Generator().manual_seed(args.seed)
        self.results: dict = {}

    def hits(self, preds) -> float:
        labels = self.test_labels
        return sum(int(p) == y for p, y in zip(preds.tolist(), labels)) / len(labels)

    def record(self, label, t0, scores=None, greedy=None, majority=None, **extra):
        greedy = scores.argmax(1) if greedy is None else greedy
        self.results[label] = r = {
            "greedy_accuracy": self.hits(greedy),
            "majority_accuracy": None if majority is None else self.hits(majority),
            "seconds": time.time() - t0,
            "predictions": [self.data.choices[i] for i in greedy], **extra}
        print(f"{label}: greedy {r['greedy_accuracy']:.3f}, majority {r['majority_accuracy']}, "
              f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)

    def scores(self, model, contexts, prefix=None, batch=None):
        return predict(model, contexts, self.data.choice_ids, prefix=prefix,
                       pad_token_id=self.pad, batch_size=batch or self.args.batch)

    def classifier(self, contexts, labels):
        """A fresh copy of the base LM trained on (context, label) pairs, and its losses."""
        a, clf = self.args, copy.deepcopy(self.base)
        losses = train_classifier(clf, contexts, labels, self.data.choice_ids,
                                  steps=a.classifier_steps, batch_size=a.classifier_batch,
                                  lr=a.classifier_lr, generator=self.gen, pad_token_id=self.pad)
        return clf, losses

    def baselines(self):
        methods, data, base = self.args.methods, self.data, self.base
        if "zero-shot" in methods:
            t0 = time.time()
            self.record("zero-shot (base LM)", t0, self.scores(base, self.empty))
        if "few-shot" in methods:
            t0 = time.time()
            prefix = data.fewshot_prefix(self.args.seed)
            self.record(f"few-shot (base LM, {len(data.train_q)} examples)", t0,
                        self.scores(base, self.empty, prefix, batch=max(1, self.args.batch // 4)),
                        prefix_tokens=len(prefix))
        if "sft" in methods:
            t0 = time.time()
            clf, losses = self.classifier([data.prompt(q) + [data.stop] for q in data.train_q],
                                          self.train_labels)
            self.record("SFT (X -> Y)", t0, self.scores(clf, self.empty),
                        classifier_losses=losses)

    def policies(self):
        from fastgfn.trainer.evaluation.loading import load_policy
        from fastgfn.trainer.model.reward import RewardLM
        from fastgfn.trainer.tasks import build_task

        task = build_task(self.cfg.replace(eval_data_path=None),
                          self.data.tokenizer, RewardLM(self.base))
        for label, path in self.args.policies:
            self.policy_rows(label, load_policy(path, self.cfg), task.policy_logit_bias())

    def policy_rows(self, label, policy, bias):
        """The E-step-only and the M-step rows of one GFlowNet policy."""
        args, data, k = self.args, self.data, self.args.k
        t0 = time.time()
        per = 1 + k
        test_ctx = [c for q in data.test_q
                    for c in draw_rationales(policy, data, q, [0.0] + [1.0] * k, self.gen, bias)]
        greedy_ctx = test_ctx[::per]
        sampled_ctx = [c for i, c in enumerate(test_ctx) if i % per]
        sample_s = time.time() - t0
        examples = [{"question": q,
                     "greedy_rationale": data.tokenizer.decode(c[len(data.prompt(q)):-1])}
                    for q, c in zip(data.test_q[:20], greedy_ctx)]

        def rows(model, t):
            votes = vote(self.scores(model, sampled_ctx), k, len(data.choices)) if k else None
            return t - sample_s, self.scores(model, greedy_ctx), votes

        t_e, greedy, votes = rows(self.base, time.time())
        self.record(f"{label} (E-step: base LM after the policy's rationales)", t_e, greedy,
                    majority=votes, rationale_examples=examples)
        t2 = time.time()
        train_ctx, labels = [], []
        for q, y in zip(data.train_q, self.train_labels):
            for c in draw_rationales(policy, data, q, [1.0] * args.m_rationales, self.gen, bias):
                train_ctx.append(c)
                labels.append(y)
        clf, losses = self.classifier(train_ctx, labels)
        t_m, greedy, votes = rows(clf, t2)
        self.record(f"{label} + M-step (classifier trained on its rationales)", t_m, greedy,
                    majority=votes, classifier_losses=losses, m_contexts=len(train_ctx))


def settings(args, cfg, data, train_path, test_path) -> dict:
    return {
        "config": args.config, "overrides": args.overrides, "model": cfg.model.name,
        "train": str(train_path), "test": str(test_path), "train_examples": len(data.train_q),
        "test_examples": len(data.test_q), "choices": data.choices, "k": args.k,
        "m_rationales": args.m_rationales, "classifier_steps": args.classifier_steps,
        "classifier_batch": args.classifier_batch, "classifier_lr": args.classifier_lr,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "min_new_tokens": cfg.sampling.min_new_tokens,
        "seed": args.seed, "policies": [list(p) for p in args.policies],
        "torch_threads": torch.get_num_threads(), "machine": machine_line(),
    }


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"### {s['train_examples']} training examples, {s['test_examples']} test "
             f"examples", "", f"| method | greedy | majority of {s['k']} at T=1 | seconds |",
             "|---|---|---|---|"]
    for label, r in report["results"].items():
        maj = "n/a" if r["majority_accuracy"] is None else f"{100 * r['majority_accuracy']:.1f}"
        lines.append(f"| {label} | {100 * r['greedy_accuracy']:.1f} | {maj} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    table = format_table(report)
    print(table)
    (out / "tables.md").write_text(table)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"results: {out / 'results.json'}")
