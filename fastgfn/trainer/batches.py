"""Where a training batch comes from: a fresh rollout of the behaviour policy, or the replay
buffer.

Each micro-batch picks one prompt and ``batch_size`` rows that continue it. With probability
``replay_prob`` (when the buffer holds rows of that prompt) the rows are drawn from the replay
buffer; otherwise they are sampled with no gradient from the behaviour policy: the policy (or
its low-precision sampling replica, and with the task's ``policy_logit_bias``), tempered with
probability ``explore_prob`` per row, or per batch (``explore_mode``; temperature uniform in
``[explore_temp_low, explore_temp_high]``, applied after the policy's bias), with a fraction
``explore_vocab_prob`` of rows restricted to the task's allowed tokens, and termination
forbidden before ``min_new_tokens``. GFlowNet losses are off-policy, so any of these is a
valid behaviour policy. Freshly sampled rows are offered to the buffer once scored.

With the task's tool (``Task.tool()``), sampled rows mix actions and tool tokens; the batch
carries the action mask (replayed rows get theirs from the buffer) and, from it, where each
state is (``Batch.states``) and how many actions each row took (``Batch.num_actions``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastgfn.trainer.engines.distributed import world_size
from fastgfn.trainer.model.loading import eval_mode
from fastgfn.trainer.replay import ReplayBuffer
from fastgfn.trainer.sampling.policy import (
    PolicyActions,
    choose_replay,
    restricted_vocabulary,
    sample_policy,
)
from fastgfn.trainer.sampling.sampler import draw_temperatures
from fastgfn.trainer.scoring import state_positions


@dataclass
class Batch:
    """Rows continuing one prompt: ``tokens [B, T]`` right-padded, ``lengths [B]``, and the
    same rows as token lists (``rows``); ``replayed`` when they came from the buffer.
    ``action_mask [B, T]`` (with a tool) is False at tool tokens; ``states [B, S + 1]`` is then
    where each state is (``scoring.state_positions``) and ``num_actions`` the actions per
    row, the lengths the loss uses. Without a tool ``states`` is None and ``num_actions`` is
    ``lengths``."""

    prompt_index: int
    tokens: torch.Tensor
    lengths: torch.Tensor
    rows: list[list[int]]
    replayed: bool
    action_mask: torch.Tensor | None = None
    dead: torch.Tensor | None = None  # [B] bool: the rows that end at a dead end (forced stop)

    def __post_init__(self):
        if self.dead is None:
            self.dead = torch.zeros(len(self.rows), dtype=torch.bool)
        if self.action_mask is None:
            self.states, self.num_actions = None, self.lengths
        else:
            self.states, self.num_actions = state_positions(self.action_mask, self.lengths)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def masks(self) -> list[list[bool]] | None:
        """Per row, whether each token is an action (None without a tool)."""
        if self.action_mask is None:
            return None
        return [m[:len(r)] for m, r in zip(self.action_mask.tolist(), self.rows)]


def cut_dead_ends(task, rows: list[list[int]], lengths: torch.Tensor) -> torch.Tensor:
    """Cut every row at its first dead state (``task.dead_index``): ``rows`` and ``lengths``
    are changed in place. Returns the rows that were cut."""
    dead = torch.zeros(len(rows), dtype=torch.bool)
    for b, row in enumerate(rows):
        t = task.dead_index(row)
        if t is not None:
            rows[b] = row[:t]
            lengths[b] = t
            dead[b] = True
    return dead


class BatchSource:
    """The source of training batches (see the module docstring)."""

    def __init__(self, sampling, task, engine, replica, buffer: ReplayBuffer,
                 py_rng: random.Random, generator: torch.Generator):
        """``sampling``: the run's sampling section (``sections.SamplingSection``)."""
        self.sampling, self.task, self.engine, self.replica = sampling, task, engine, replica
        self.buffer, self.py_rng, self.generator = buffer, py_rng, generator
        self.actions = PolicyActions.of(task, engine.device)

    @property
    def policy_bias(self) -> torch.Tensor | None:
        """The task's policy bias on the engine's device: also where the policy is scored."""
        return self.actions.logit_bias

    def next_batch(self) -> Batch:
        """The next micro-batch, final: with ``dead_ends``, every row is cut at its first dead
        state (``Batch.dead``)."""
        batch = self._draw()
        if self.sampling.dead_ends:
            batch.dead = cut_dead_ends(self.task, batch.rows, batch.lengths)
        return batch

    def _draw(self) -> Batch:
        prompt_index = self.py_rng.randrange(self.task.num_prompts())
        if self._replay(prompt_index):
            if self.task.tool() is None:
                rows = self.buffer.sample(prompt_index, self.sampling.batch_size, self.py_rng)
                tokens, lengths = ReplayBuffer.to_tensors(rows, self.task.pad_token_id)
                return Batch(prompt_index, tokens, lengths, rows, True)
            rows, masks = self.buffer.sample_with_masks(prompt_index, self.sampling.batch_size,
                                                        self.py_rng)
            tokens, lengths = ReplayBuffer.to_tensors(rows, self.task.pad_token_id)
            mask = torch.zeros(tokens.shape, dtype=torch.bool)
            for b, m in enumerate(masks):
                mask[b, : len(m)] = torch.tensor(m, dtype=torch.bool)
            return Batch(prompt_index, tokens, lengths, rows, True, mask)
        return self._sample(prompt_index)

    def _replay(self, prompt_index: int) -> bool:
        return choose_replay(self.py_rng, self.sampling.replay_prob,
                             self.buffer.size(prompt_index) > 0, world_size() > 1)

    def _vocab_restriction(self) -> torch.Tensor | None:
        """Per-row vocabulary bias: 0 everywhere, or -inf outside the task's allowed tokens
        for a fraction ``explore_vocab_prob`` of the rows; None when not restricting."""
        cfg = self.sampling
        allowed = self.task.allowed_token_ids() if cfg.explore_vocab_prob > 0 else None
        if allowed is None:
            return None
        return restricted_vocabulary(cfg.batch_size, allowed, cfg.explore_vocab_prob,
                                     self.engine.module.config.vocab_size, self.generator,
                                     self.engine.device)

    @torch.no_grad()
    def _sample(self, prompt_index: int) -> Batch:
        cfg = self.sampling
        temps = draw_temperatures(cfg.batch_size, prob=cfg.explore_prob,
                                  low=cfg.explore_temp_low, high=cfg.explore_temp_high,
                                  generator=self.generator,
                                  per_batch=cfg.explore_mode == "per_batch")
        bias = self._vocab_restriction()
        with eval_mode(self.engine.module) as model:
            behaviour = model if self.replica is None else self.replica.sync(model)
            r = sample_policy(
                behaviour, self.task.prompt_tokens(prompt_index).to(self.engine.device),
                cfg.batch_size, self.actions,
                max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                temperatures=temps, vocab_bias=bias, generator=self.generator,
                param_context=self.engine.param_context(),
            )
        mask = None if r.action_mask is None else r.action_mask.cpu()
        return Batch(prompt_index, r.tokens.cpu(), r.lengths.cpu(), r.rows(), False, mask)

    def remember(self, batch: Batch, final_log_rewards: list[float]) -> None:
        """Offer freshly sampled rows (with their untempered final log-rewards) to the buffer."""
        if not batch.replayed:
            self.buffer.add_batch(batch.prompt_index, batch.rows, final_log_rewards,
                                  batch.masks())
