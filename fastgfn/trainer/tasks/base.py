"""What a task is: prompts, a termination token, and a log-reward for every prefix.

The trainer talks to a task only through ``Task``. The required part is abstract; the
optional capabilities have default methods that say "not supported" (``None`` or ``{}``), so
the trainer never probes a task with ``hasattr``:

- ``dead_index(row)``: the first state from which the row can never become valid (dead ends);
- ``allowed_token_ids()``: the tokens restricted exploration may use;
- ``policy_logit_bias()``: a vocabulary bias that is part of the policy (the paper's
  illegal-token penalty), added to its logits wherever it samples or is scored;
- ``policy_metrics(engine, min_new_tokens)``: exact metrics computed from the policy itself
  (the random-number task's exact distribution), logged during and after training;
- ``tool()``: the tool the sampler runs after its trigger actions (``fastgfn.trainer.tools``;
  the run's ``tool`` key, set by ``build_task``). With a tool, rows mix actions and tool
  tokens, and the loss reads rewards at the states only (``state_log_rewards``). Dead ends
  (``dead_index``) are not supported together with a tool.
"""

from __future__ import annotations

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.model.loading import pad_token_id
from fastgfn.trainer.tasks.options import TaskOptions


class Task:
    name = ""
    Options = TaskOptions  # the task's section of the config: its keys and their checks
    description = ""  # what the task trains the model to do, for the model card; filled in
    #   with the config's flat keys (``{task_low}``)
    needs_reward_model = False  # scored by a frozen reward LM (the ``reward_model`` key)
    termination_token_id: int
    tokenizer = None

    @classmethod
    def check_config(cls, cfg) -> None:
        """The task's own config checks (before anything loads); ``ConfigError`` names the key."""

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None) -> Task:
        raise NotImplementedError

    @classmethod
    def sft_pairs(cls, cfg, tokenizer) -> list[tuple] | None:
        """The SFT baseline's examples (``python -m fastgfn.trainer.baselines.sft``): per
        training example ``(prompt, completion, loss mask or None)``, as token ids or text; None
        when the task has no supervised targets."""
        return None

    # prompts and rewards ------------------------------------------------------------------
    def num_prompts(self) -> int:
        raise NotImplementedError

    def prompt_tokens(self, index: int) -> torch.Tensor:
        """Token ids of prompt ``index`` (1-D, non-empty)."""
        raise NotImplementedError

    def log_rewards(self, prompt_index: int, rows: list[list[int]], T: int) -> torch.Tensor:
        """``[len(rows), T + 1]`` float32 on the CPU: ``log R(z_1..z_t STOP)`` of every prefix
        t = 0..T of every row (not divided by the reward temperature). Entries past a row's
        length are never read by the loss."""
        raise NotImplementedError

    def state_log_rewards(self, prompt_index: int, rows: list[list[int]], T: int,
                          states: torch.Tensor | None = None) -> torch.Tensor:
        """The rewards the loss reads: ``log_rewards`` (``states`` None), or with a tool its
        prefixes at the states, ``[len(rows), S + 1]``: entry ``[b, t]`` is the reward of
        stopping after the first ``states[b, t]`` tokens of row b (``scoring.state_positions``).
        A task may compute only those prefixes."""
        log_r = self.log_rewards(prompt_index, rows, T)
        return log_r if states is None else log_r.gather(1, states.cpu())

    def text(self, row: list[int]) -> str:
        return self.tokenizer.decode(row)

    def prompt_text(self, index: int) -> str:
        return self.tokenizer.decode(self.prompt_tokens(index).tolist())

    def evaluate(self, texts: list[str], terminated: list[bool]) -> dict:
        """Metrics of sampled continuations (texts, and whether each ended with STOP)."""
        n = max(1, len(texts))
        return {"samples": len(texts), "terminated_fraction": sum(terminated) / n,
                "distinct": len(set(texts))}

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)

    # optional capabilities ----------------------------------------------------------------
    def dead_index(self, row: list[int]) -> int | None:
        """The first t >= 1 whose prefix can never become valid, or None (none, or the task
        cannot tell). The trainer ends the row there as a forced stop."""
        return None

    def allowed_token_ids(self) -> list[int] | None:
        """Tokens for restricted exploration (``explore_vocab_prob``), or None for all."""
        return None

    def policy_logit_bias(self) -> torch.Tensor | None:
        """``[V]`` float32 added to the policy's logits wherever it samples (before the
        temperature) or is scored, or None."""
        return None

    def worked_rows(self) -> list[tuple[list[int], list[bool]] | None] | None:
        """Per prompt, a known good continuation as the sampler would produce it, ``(token
        ids without the termination token, action mask)`` (None for a prompt without one),
        or None when the task has none. ``replay_seed`` starts the buffer with them."""
        return None

    def answer_task(self, cfg, tokenizer, reward) -> Task | None:
        """The questions the evaluation scores for answer accuracy (a task with
        ``answer_accuracy(engine, cfg, generator)``: the reasoning task's), or None when the task
        has none."""
        return None

    def policy_metrics(self, engine, min_new_tokens: int) -> dict:
        """Exact metrics of the policy (no sampling), or {} when the task has none."""
        return {}

    _tool = None

    def tool(self):
        """The tool the sampler runs for this task (``fastgfn.trainer.tools.Tool``), or None."""
        return self._tool

    def set_tool(self, tool) -> None:
        self._tool = tool


def termination_token(tokenizer, termination: str) -> int:
    """The id of the termination token: ``termination`` must encode to exactly one token
    that decodes back to it (``eos``/``<eos>`` name the tokenizer's end-of-sequence token)."""
    if termination in ("eos", "<eos>"):
        return int(tokenizer.eos_token_id)
    ids = tokenizer.encode(termination, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"termination: {termination!r} must be a single token, it encodes to {ids}"
        )
    if tokenizer.decode(ids) != termination:
        raise ConfigError(
            f"termination: the tokenizer cannot represent {termination!r} (it decodes back as "
            f"{tokenizer.decode(ids)!r})"
        )
    return int(ids[0])
