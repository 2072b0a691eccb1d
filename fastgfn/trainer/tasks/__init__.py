"""Tasks: a prompt source, a termination token and a log-reward for every prefix
(``base.Task``). ``task_class`` maps the ``task`` config key to its class; modules are
imported only when their task is asked for."""

from __future__ import annotations

import importlib

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.tasks.base import Task

TASKS = {
    "random_number": ("fastgfn.trainer.tasks.random_number", "RandomNumberTask"),
    "continuation": ("fastgfn.trainer.tasks.continuation", "ContinuationTask"),
    "reasoning": ("fastgfn.trainer.tasks.reasoning", "LatentReasoningTask"),
    "arithmetic": ("fastgfn.trainer.tasks.arithmetic", "ArithmeticTask"),
    "infilling": ("fastgfn.trainer.tasks.infilling", "StoryInfillingTask"),
}


def task_class(name: str) -> type[Task]:
    """The ``Task`` subclass of the task named ``name`` (the ``task`` config key)."""
    if name not in TASKS:
        raise ConfigError(f"task: must be one of {tuple(TASKS)}, got {name!r}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, tokenizer, reward=None) -> Task:
    """The task of ``cfg.task.name`` with the run's tool (``cfg.task.tool``); ``reward`` is
    the frozen ``RewardLM`` of tasks that need one."""
    from fastgfn.trainer.tools import build_tool

    task = task_class(cfg.task.name).from_config(cfg, tokenizer, reward)
    task.set_tool(build_tool(cfg, tokenizer))
    return task


__all__ = ["TASKS", "Task", "build_task", "task_class"]
