"""Evaluation of the policy as it is (temperature 1, no exploration, no vocabulary bias):
sampled metrics of the task, the task's exact metrics of the policy where it has them, and
the answer accuracy of a task with an answer task (the reasoning task's
``answer_accuracy``)."""

from __future__ import annotations

import math

import torch

from fastgfn.trainer.engines.distributed import world_size
from fastgfn.trainer.model.loading import eval_mode
from fastgfn.trainer.sampling.policy import policy_samples


@torch.no_grad()
def sample_texts(engine, task, cfg, n: int, generator: torch.Generator, progress=None):
    """``n`` samples of the policy (split over ranks; gathered on every rank)."""
    per_rank = math.ceil(n / world_size())
    texts, terms = [], []
    done = 0
    with eval_mode(engine.module), engine.param_context():
        while done < per_rank:
            b = min(cfg.evaluation.eval_batch_size, per_rank - done)
            r = policy_samples(engine, task, (done // b) % task.num_prompts(), b,
                               cfg.sampling, generator)
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


def evaluate(engine, task, cfg, generator, progress=None, answer_task=None) -> dict:
    """Sampled metrics of the task; the task's exact metrics of the policy; the answer
    accuracy on ``answer_task`` (reasoning task, ``eval_rationales > 0``)."""
    texts, terms = sample_texts(engine, task, cfg, cfg.evaluation.eval_samples, generator, progress)
    metrics = task.evaluate(texts, terms)
    metrics.update(task.policy_metrics(engine, cfg.sampling.min_new_tokens))
    if answer_task is not None and cfg.evaluation.eval_rationales > 0:
        metrics.update(answer_task.answer_accuracy(engine, cfg, generator))
    return metrics
