"""Seeding the replay buffer with the task's worked rationales (``replay_seed``).

The paper's code starts its buffer with the training set's hand-written rationales, each
scored by the reward (its ``load_replay_buffer``), so that replayed batches show the policy
the high-reward mode that on-policy exploration from a small model does not find: a worked
arithmetic rationale scores about -6 nats while the policy's own first samples score -30 to
-80, and stopping after fewer steps is the first improvement those samples reveal. Here each
worked row comes from ``Task.worked_rows`` (the tokens the sampler with the tool would
produce, its action mask marking the tool's results) and enters the buffer with its
untempered final log-reward, computed at the states as the trainer does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.replay import ReplayBuffer
from fastgfn.trainer.scoring import state_positions


def worked_batch(row: list[int], mask: list[bool], pad_token_id: int):
    """One worked row as a batch: ``(tokens [1, T], lengths [1], states or None)``."""
    tokens, lengths = ReplayBuffer.to_tensors([row], pad_token_id)
    if all(mask):
        return tokens, lengths, None
    action = torch.zeros(tokens.shape, dtype=torch.bool)
    action[0, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    states, _ = state_positions(action, lengths)
    return tokens, lengths, states


class ScoredWorkedRow(NamedTuple):
    prompt: int
    row: list[int]
    mask: list[bool]
    tokens: torch.Tensor  # [1, T]
    states: torch.Tensor | None  # state positions (None: every token is an action)
    log_rewards: torch.Tensor  # [T + 1] untempered, at the states; the final one at sum(mask)


@torch.no_grad()
def scored_worked_rows(task) -> Iterator[ScoredWorkedRow]:
    """Every worked row of ``task`` (prompts without one skipped) with its untempered
    log-rewards at the states, computed as the trainer does (``Task.state_log_rewards``)."""
    for p, item in enumerate(task.worked_rows() or []):
        if item is None:
            continue
        row, mask = item
        tokens, _, states = worked_batch(row, mask, task.pad_token_id)
        log_r = task.state_log_rewards(p, [row], tokens.shape[1], states)[0]
        yield ScoredWorkedRow(p, row, mask, tokens, states, log_r)


def worked_log_rewards(task) -> list[tuple[int, list[int], list[bool], float]]:
    """``(prompt, row, action mask, untempered final log-reward)`` of every worked row."""
    scored = [(w.prompt, w.row, w.mask, float(w.log_rewards[sum(w.mask)]))
              for w in scored_worked_rows(task)]
    if not scored and not task.worked_rows():
        raise ConfigError(f"replay_seed: task {task.name!r} has no worked rationales to seed "
                          "the buffer with (arithmetic: rationale_key in data_path)")
    return scored


def seed_buffer(buffer: ReplayBuffer, task, min_actions: int = 0,
                max_actions: int | None = None) -> tuple[int, int]:
    """Offer every worked row with ``min_actions`` to ``max_actions`` actions (the rows the
    sampler could have produced) to ``buffer``: ``(how many entered, how many were out of
    those bounds)``."""
    entered = outside = 0
    for p, row, mask, lr in worked_log_rewards(task):
        n = sum(mask)
        if n < min_actions or (max_actions is not None and n > max_actions):
            outside += 1
            continue
        entered += buffer.add(p, row, lr, mask)
    return entered, outside
