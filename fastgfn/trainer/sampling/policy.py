"""Sampling a policy: the one entry point through which the trainer's rollout, the evaluation,
the evaluation commands, the baselines and the TRL trainer call the sampler
(``sampler.sample``; ``tests/test_layout.py`` keeps it that way).

``PolicyActions`` is what a policy emits besides its tokens' logits: the termination token,
the padding of finished rows, the vocabulary bias that is part of the policy (the task's
``policy_logit_bias``: added before the temperature, also where the policy is scored) and the
tool the sampler runs after its trigger actions. ``PolicyActions.of(task)`` takes them from a
task; a caller without a task (the TRL trainer) names them itself.

What may differ between callers is the behaviour policy: the temperatures (per row; 0 is
greedy), a per-row ``vocab_bias`` added after the temperature (restricted exploration, or an
evaluation's suppressed tokens), the length limits and the random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgfn.trainer.engines.distributed import all_ranks_agree
from fastgfn.trainer.sampling.sampler import Rollout, sample


@dataclass(frozen=True)
class PolicyActions:
    termination_token_id: int
    pad_token_id: int = 0
    logit_bias: torch.Tensor | None = None  # [V] float32, part of the policy
    tool: object = None  # ``fastgfn.trainer.tools.Tool`` or None

    @classmethod
    def of(cls, task, device=None) -> PolicyActions:
        """A task's termination and padding tokens, policy bias (moved to ``device`` when
        given) and tool."""
        bias = task.policy_logit_bias()
        if bias is not None and device is not None:
            bias = bias.to(device)
        return cls(task.termination_token_id, task.pad_token_id, bias, task.tool())


def sample_policy(model, prompt_ids: torch.Tensor, n: int, actions: PolicyActions, *,
                  max_new_tokens: int, min_new_tokens: int = 0,
                  temperatures: torch.Tensor | float = 1.0,
                  vocab_bias: torch.Tensor | None = None, generator=None,
                  param_context=None) -> Rollout:
    """``n`` continuations of ``prompt_ids`` (1-D, or one prompt per row) from ``model`` with
    ``actions``, at most ``max_new_tokens`` actions and termination forbidden before
    ``min_new_tokens``; no gradient. ``param_context``: the engine's context that gathers
    ZeRO-3 parameters (the caller's, when it already holds one)."""
    return sample(
        model, prompt_ids, n,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        termination_token_id=actions.termination_token_id,
        temperatures=temperatures,
        logit_bias=actions.logit_bias,
        vocab_bias=vocab_bias,
        pad_token_id=actions.pad_token_id,
        generator=generator,
        param_context=param_context,
        tool=actions.tool,
    )


def policy_samples(engine, task, prompt_index: int, n: int, sampling, generator,
                   temperature: float = 1.0) -> Rollout:
    """``n`` continuations of prompt ``prompt_index`` from the policy as it is (no exploration,
    no vocabulary restriction; the task's ``policy_logit_bias`` is part of the policy), at
    ``temperature`` (0: greedy), within the length limits of ``sampling`` (the run's
    sampling section)."""
    return sample_policy(
        engine.module, task.prompt_tokens(prompt_index).to(engine.device), n,
        PolicyActions.of(task, engine.device),
        max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
        temperatures=temperature, generator=generator,
    )


# the behaviour policy's exploration, shared by the rollout and the TRL trainer -------------
def restricted_vocabulary(n: int, allowed: list[int], prob: float, vocab_size: int,
                          generator: torch.Generator, device) -> torch.Tensor:
    """``[n, V]`` per-row vocabulary bias: -inf outside ``allowed`` for a fraction ``prob`` of
    the rows (one uniform per row from ``generator``), 0 everywhere for the others."""
    rows = torch.rand(n, generator=generator, device=device) < prob
    mask = torch.full((vocab_size,), float("-inf"), device=device)
    mask[torch.tensor(allowed, device=device)] = 0.0
    return torch.where(rows[:, None], mask[None], torch.zeros(1, vocab_size, device=device))


def choose_replay(py_rng, prob: float, available: bool, distributed: bool) -> bool:
    """Whether a batch comes from the replay buffer: with probability ``prob`` when it holds
    rows of the prompt. ``distributed``: every rank must agree (sampling runs collectives,
    replay none), so any rank that cannot replay makes all ranks sample."""
    use = py_rng.random() < prob and available
    if distributed:
        use = all_ranks_agree(use)
    return use
