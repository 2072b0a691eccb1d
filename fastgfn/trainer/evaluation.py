"""Evaluation of the policy as it is (temperature 1, no exploration, no vocabulary bias):
sampled metrics of the task, the task's exact metrics of the policy where it has them, and
the reasoning task's answer accuracy."""

from __future__ import annotations

import dataclasses
import math

import torch

from fastgfn.trainer.engines.distributed import rank, world_size
from fastgfn.trainer.models import eval_mode
from fastgfn.trainer.sampling.sampler import sample

# Answer accuracy scores every distinct answer after every rationale: a classification label
# set, not free-form answers such as the arithmetic task's numbers.
MAX_ANSWER_CHOICES = 32


@torch.no_grad()
def sample_texts(engine, task, cfg, n: int, generator: torch.Generator, progress=None):
    """``n`` samples of the policy (split over ranks; gathered on every rank)."""
    per_rank = math.ceil(n / world_size())
    texts, terms = [], []
    done = 0
    with eval_mode(engine.module), engine.param_context():
        while done < per_rank:
            b = min(cfg.eval_batch_size, per_rank - done)
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
    bias = task.policy_logit_bias()
    return sample(
        engine.module,
        task.prompt_tokens(prompt_index).to(engine.device),
        n,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        termination_token_id=task.termination_token_id,
        temperatures=temperature,
        logit_bias=None if bias is None else bias.to(engine.device),
        pad_token_id=task.pad_token_id,
        generator=generator,
        tool=task.tool(),
    )


def evaluate(engine, task, cfg, generator, progress=None, answer_task=None) -> dict:
    """Sampled metrics of the task; the task's exact metrics of the policy; the answer
    accuracy on ``answer_task`` (reasoning task, ``eval_rationales > 0``)."""
    texts, terms = sample_texts(engine, task, cfg, cfg.eval_samples, generator, progress)
    metrics = task.evaluate(texts, terms)
    metrics.update(task.policy_metrics(engine, cfg.min_new_tokens))
    if answer_task is not None and cfg.eval_rationales > 0:
        metrics.update(answer_accuracy(engine, answer_task, cfg, generator))
    return metrics


def build_answer_task(cfg, task, tokenizer, reward):
    """The reasoning questions scored for answer accuracy (``eval_data_path``, else the
    training questions), or None when the run has no accuracy evaluation. The choices are
    every answer seen in either set."""
    if cfg.task != "reasoning" or cfg.eval_rationales <= 0 or cfg.eval_samples <= 0:
        return None
    answers = set(task.answers)
    if cfg.eval_data_path:
        from fastgfn.trainer.tasks.reasoning import LatentReasoningTask, load_examples

        eval_cfg = dataclasses.replace(cfg, data_path=cfg.eval_data_path)
        answers |= set(load_examples(cfg.eval_data_path, cfg.question_key, cfg.answer_key)[1])
        tool = task.tool()
        task = LatentReasoningTask.from_config(eval_cfg, tokenizer, reward, sorted(answers))
        task.set_tool(tool)
    if len(answers) > MAX_ANSWER_CHOICES:
        raise ValueError(
            f"eval_rationales: answer accuracy scores every distinct answer and needs at "
            f"most {MAX_ANSWER_CHOICES}, found {len(answers)}; set eval_rationales=0"
        )
    return task


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
    n = task.num_prompts() if cfg.eval_questions <= 0 else min(cfg.eval_questions,
                                                                task.num_prompts())
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


def _question_predictions(engine, task, cfg, i: int, generator) -> list[bool]:
    """Whether the greedy, majority, mean-probability and zero-shot predictions of question
    ``i`` are its answer (one scoring call for all rationales)."""
    choices = task.choices
    with engine.param_context():
        sampled = policy_samples(engine, task, cfg, i, cfg.eval_rationales, generator).rows()
        greedy = policy_samples(engine, task, cfg, i, 1, generator, temperature=0.0).rows()
    ll = task.choice_log_likelihoods(i, sampled + greedy + [[]], choices)  # [R + 2, C]
    votes = torch.bincount(ll[: len(sampled)].argmax(1), minlength=len(choices))
    preds = [
        int(ll[len(sampled)].argmax()),  # greedy
        int(votes.argmax()),  # majority (argmax: the first of tied choices)
        int(ll[: len(sampled)].log_softmax(1).exp().mean(0).argmax()),  # mean probability
        int(ll[-1].argmax()),  # zero-shot
    ]
    return [choices[p] == task.answers[i] for p in preds]
