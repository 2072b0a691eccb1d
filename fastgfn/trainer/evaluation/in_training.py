"""Evaluation of the policy as it is (temperature 1, no exploration, no vocabulary bias):
sampled metrics of the task, the task's exact metrics of the policy where it has them, and
the reasoning task's answer accuracy."""

from __future__ import annotations

import math

import torch

from fastgfn.trainer.engines.distributed import rank, world_size
from fastgfn.trainer.model.loading import eval_mode
from fastgfn.trainer.sampling.policy import PolicyActions, sample_policy


@torch.no_grad()
def sample_texts(engine, task, cfg, n: int, generator: torch.Generator, progress=None):
    """``n`` samples of the policy (split over ranks; gathered on every rank)."""
    per_rank = math.ceil(n / world_size())
    texts, terms = [], []
    done = 0
    with eval_mode(engine.module), engine.param_context():
        while done < per_rank:
            b = min(cfg.evaluation.eval_batch_size, per_rank - done)
            r = policy_samples(engine, task, cfg, (done // b) % task.num_prompts(), b, generator)
            texts += [task.text(x) for x in r.rows()]
            terms += r.terminated.tolist()
            done += b
            if progress is not None:
                progress(b)
    if world_size() > 1:
        gathered = [None] * world_size()
        torch.distributed.all_gather_object(gathered, (texts, terms))
        texts = [t for g in gathered for t in g[0]]
        terms = [t for g in gathered for t in g[1]]
    return texts[:n], terms[:n]


def policy_samples(engine, task, cfg, prompt_index: int, n: int, generator,
                   temperature: float = 1.0):
    """``n`` continuations of prompt ``prompt_index`` from the policy as it is (no exploration,
    no vocabulary restriction; the task's ``policy_logit_bias`` is part of the policy), at
    ``temperature`` (0: greedy), within the run's length limits."""
    return sample_policy(
        engine.module, task.prompt_tokens(prompt_index).to(engine.device), n,
        PolicyActions.of(task, engine.device),
        max_new_tokens=cfg.sampling.max_new_tokens, min_new_tokens=cfg.sampling.min_new_tokens,
        temperatures=temperature, generator=generator,
    )


def evaluate(engine, task, cfg, generator, progress=None, answer_task=None) -> dict:
    """Sampled metrics of the task; the task's exact metrics of the policy; the answer
    accuracy on ``answer_task`` (reasoning task, ``eval_rationales > 0``)."""
    texts, terms = sample_texts(engine, task, cfg, cfg.evaluation.eval_samples, generator, progress)
    metrics = task.evaluate(texts, terms)
    metrics.update(task.policy_metrics(engine, cfg.sampling.min_new_tokens))
    if answer_task is not None and cfg.evaluation.eval_rationales > 0:
        metrics.update(answer_accuracy(engine, answer_task, cfg, generator))
    return metrics


@torch.no_grad()
def answer_accuracy(engine, task, cfg, generator) -> dict:
    """Reasoning task, on its first ``eval_questions`` questions (0: all). For each, the
    reward LM scores every choice c after a rationale z, ``log p(Y_c | X z STOP)``, and a
    rationale's prediction is its likeliest choice. Four accuracies (the paper's evaluation
    and two more):

    - greedy: the prediction after one rationale decoded greedily from the policy;
    - majority: the most frequent prediction over ``eval_rationales`` rationales sampled at
      temperature 1 (ties go to the choice listed first);
    - mean probability: the choice with the largest mean over those rationales of
      ``p(c | X z) = p(Y_c | X z STOP) / sum_c' p(Y_c' | X z STOP)``;
    - zero-shot: the prediction after the empty rationale (``X STOP Y_c``).

    Questions are split over the ranks, each rank taking the same number (ZeRO-3: the same
    calls), and the counts are summed."""
    asked = cfg.evaluation.eval_questions
    n = task.num_prompts() if asked <= 0 else min(asked, task.num_prompts())
    per_rank = math.ceil(n / world_size())
    counts = torch.zeros(5, dtype=torch.float64)  # questions, greedy, majority, mean, zero-shot
    with eval_mode(engine.module):
        for j in range(per_rank):
            i = rank() * per_rank + j
            real = i < n
            i = i % n  # padding: a repeat that is not counted
            correct = _question_predictions(engine, task, cfg, i, generator)
            if real:
                counts += torch.tensor([1.0, *correct], dtype=torch.float64)
    if world_size() > 1:
        counts = counts.to(engine.device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    total = max(1.0, float(counts[0]))
    return {
        "answer_questions": int(counts[0]),
        "answer_accuracy_greedy": float(counts[1]) / total,
        "answer_accuracy_majority": float(counts[2]) / total,
        "answer_accuracy": float(counts[3]) / total,
        "zero_shot_accuracy": float(counts[4]) / total,
    }


def majority_vote(predictions: torch.Tensor, n_choices: int) -> torch.Tensor:
    """The most frequent choice in each row of ``predictions [n, k]`` (choice indices); ties
    go to the choice listed first."""
    counts = torch.stack([(predictions == c).sum(1) for c in range(n_choices)], 1)
    return counts.argmax(1)


def _question_predictions(engine, task, cfg, i: int, generator) -> list[bool]:
    """Whether the greedy, majority, mean-probability and zero-shot predictions of question
    ``i`` are its answer (one scoring call for all rationales)."""
    choices = task.choices
    with engine.param_context():
        sampled = policy_samples(engine, task, cfg, i, cfg.evaluation.eval_rationales,
                                 generator).rows()
        greedy = policy_samples(engine, task, cfg, i, 1, generator, temperature=0.0).rows()
    ll = task.choice_log_likelihoods(i, sampled + greedy + [[]], choices)  # [R + 2, C]
    preds = [
        int(ll[len(sampled)].argmax()),  # greedy
        int(majority_vote(ll[: len(sampled)].argmax(1)[None], len(choices))[0]),  # majority
        int(ll[: len(sampled)].log_softmax(1).exp().mean(0).argmax()),  # mean probability
        int(ll[-1].argmax()),  # zero-shot
    ]
    return [choices[p] == task.answers[i] for p in preds]
