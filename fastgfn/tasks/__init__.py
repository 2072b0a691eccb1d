"""Tasks: a prompt source, a termination token and a log-reward for every prefix."""

from __future__ import annotations


def build_task(cfg, tokenizer, **kwargs):
    """Construct the task named by ``cfg.task``."""
    if cfg.task == "random_number":
        from fastgfn.tasks.random_number import RandomNumberTask

        return RandomNumberTask.from_config(cfg, tokenizer)
    if cfg.task == "continuation":
        from fastgfn.tasks.continuation import ContinuationTask

        return ContinuationTask.from_config(cfg, tokenizer, **kwargs)
    if cfg.task == "reasoning":
        from fastgfn.tasks.reasoning import LatentReasoningTask

        return LatentReasoningTask.from_config(cfg, tokenizer, **kwargs)
    raise ValueError(f"task: unknown task {cfg.task!r}")
