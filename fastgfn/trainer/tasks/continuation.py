"""Sentence continuation (Hu et al. 2024, section 4.1).

Prompts: one per line of a text file (the paper's OpenWebText prompts). The policy samples a
continuation that ends with the termination token (default "."); the reward of every prefix
is the frozen reward LM's likelihood of that prefix followed by the termination token,
``log R(s_t STOP) = log p_LM(s_t STOP | X)`` (divided by the reward temperature by the
trainer). The reward LM is a frozen ``model.reward.RewardLM``: by default the initial policy
(a frozen copy, or with LoRA the same model with its adapters disabled).

Illegal tokens (as in the paper, which adds -50 to their logits): special tokens (EOS, chat
markers), tokens with a line break or tab, and tokens other than the termination token that
contain the termination text ("...", '."'). ``illegal_token_bias`` (default -50, 0 turns it
off) is added to the reward LM's logits of these tokens, so a continuation that uses one
loses about 50 nats of log-reward, and ``allowed_token_ids`` lets the trainer's restricted
exploration (``explore_vocab_prob``) sample some rows without them.

The prompt is tokenized as it stands, without a trailing space: with byte-level BPE
tokenizers (GPT-2, SmolLM2) a trailing space becomes a token of its own, after which the
model rarely sees a word (words carry their leading space), and it continued with line
breaks and digits instead of a sentence.

Held-out prompts: ``from_config`` trains on a fixed part of the prompts file only;
``data.split_prompts`` holds out ``heldout_fraction`` of them (the paper's code holds out 5%),
chosen by ``heldout_seed`` alone (never the run's ``seed``), so every run and the evaluation
command (``fastgfn.trainer.evaluation.continuation``) agree on which prompts training never sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.model.reward import RewardLM
from fastgfn.trainer.replay import ReplayBuffer
from fastgfn.trainer.tasks.base import Task, termination_token
from fastgfn.trainer.tasks.data import read_prompts, split_prompts
from fastgfn.trainer.tasks.options import RewardLMOptions, check_heldout_fraction


def heldout_prompts(cfg) -> list[str]:
    """The prompts of ``cfg.task.data_path`` that training with ``cfg`` never sees."""
    opts = cfg.task
    return split_prompts(read_prompts(opts.data_path), opts.heldout_fraction, opts.heldout_seed)[1]


@dataclass
class ContinuationOptions(RewardLMOptions):
    heldout_fraction: float = 0.05  # prompts held out of training (the paper's code trains on
    #   95%), for `python -m fastgfn.trainer.evaluation.continuation`
    heldout_seed: int = 0  # the split's own seed (not `seed`); < 0: the last prompts of the
    #   file, as the paper's code splits

    def check(self) -> None:
        super().check()
        check_heldout_fraction(self.heldout_fraction)


class ContinuationTask(Task):
    name = "continuation"
    Options = ContinuationOptions
    description = ("continue a prompt with a sentence, sampled in proportion to the frozen "
                   "reward LM's likelihood raised to 1 / T (section 4.1)")
    needs_reward_model = True

    def __init__(
        self,
        tokenizer,
        prompts: list[str],
        reward: RewardLM | torch.nn.Module,
        *,
        termination: str = ".",
        use_fused: bool = True,
        illegal_token_bias: float = -50.0,
        bias_in_policy: bool = True,
    ):
        if not prompts:
            raise ValueError("data_path: the prompts file holds no prompts")
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.reward = reward if isinstance(reward, RewardLM) else RewardLM(reward)
        self.use_fused = use_fused
        self.termination_token_id = termination_token(tokenizer, termination)
        self.termination = termination
        if not illegal_token_bias <= 0:
            raise ValueError(f"illegal_token_bias: must be <= 0, got {illegal_token_bias}")
        self.illegal_token_bias = float(illegal_token_bias)
        self.bias_in_policy = bool(bias_in_policy)
        self._ids = {}
        self._illegal = None
        self._allowed = None

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.task.data_path:
            raise ConfigError("data_path: the continuation task needs a prompts file")
        if not Path(cfg.task.data_path).is_file():
            raise ConfigError(f"data_path: no such prompts file {cfg.task.data_path!r}")
        if not read_prompts(cfg.task.data_path):
            raise ConfigError(f"data_path: the prompts file {cfg.task.data_path!r} holds no "
                              "prompts")

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None):
        prompts = read_prompts(cfg.task.data_path)
        try:
            prompts, _ = split_prompts(prompts, cfg.task.heldout_fraction, cfg.task.heldout_seed)
        except ValueError as exc:
            raise ConfigError(f"{exc} ({cfg.task.data_path!r})") from exc
        return cls(tokenizer, prompts, reward, termination=cfg.task.termination,
                   use_fused=cfg.objective.use_fused_logprobs,
                   illegal_token_bias=cfg.task.illegal_token_bias,
                   bias_in_policy=cfg.task.illegal_token_bias_in_policy)

    @property
    def reward_model(self) -> torch.nn.Module:
        return self.reward.model

    def num_prompts(self) -> int:
        return len(self.prompts)

    def prompt_tokens(self, index: int) -> torch.Tensor:
        if index not in self._ids:
            self._ids[index] = torch.tensor(
                self.tokenizer.encode(self.prompts[index], add_special_tokens=False)
            )
        return self._ids[index]

    # illegal tokens -------------------------------------------------------------------
    def vocab_size(self) -> int:
        return self.reward.vocab_size

    def illegal_token_ids(self) -> list[int]:
        """Special tokens, tokens with a line break or tab, tokens other than the
        termination that contain its text, and model ids past the tokenizer's vocabulary."""
        if self._illegal is None:
            tok, V = self.tokenizer, self.vocab_size()
            special = set(getattr(tok, "all_special_ids", None) or [])
            special |= set(getattr(tok, "added_tokens_decoder", None) or {})
            for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
                if getattr(tok, name, None) is not None:
                    special.add(int(getattr(tok, name)))
            n = min(len(tok), V)
            texts = [tok.decode([i]) for i in range(n)]
            illegal = set(range(n, V)) | {i for i in special if 0 <= i < V}
            for i, text in enumerate(texts):
                if any(c in text for c in "\n\r\t") or (self.termination in text):
                    illegal.add(i)
            illegal.discard(self.termination_token_id)
            self._illegal = sorted(illegal)
        return self._illegal

    def allowed_token_ids(self) -> list[int]:
        """Every token but the illegal ones (the trainer's restricted exploration)."""
        if self._allowed is None:
            illegal = set(self.illegal_token_ids())
            self._allowed = [i for i in range(self.vocab_size()) if i not in illegal]
        return self._allowed

    def vocab_bias(self) -> torch.Tensor | None:
        """``[V]`` float32: ``illegal_token_bias`` at the illegal tokens, 0 elsewhere (None
        when the bias is 0). The reward LM's logits get it."""
        if self.illegal_token_bias == 0:
            return None
        bias = torch.zeros(self.vocab_size())
        bias[self.illegal_token_ids()] = self.illegal_token_bias
        return bias

    def policy_logit_bias(self) -> torch.Tensor | None:
        """The same bias on the policy's logits (``illegal_token_bias_in_policy``, the
        paper's behaviour), else None."""
        return self.vocab_bias() if self.bias_in_policy else None

    def _check_rows(self, prompt_index: int, rows: list[list[int]], T: int) -> None:
        if not 0 <= prompt_index < len(self.prompts):
            raise ValueError(
                f"prompt_index: must be in [0, {len(self.prompts)}), got {prompt_index}"
            )
        if T < 0 or any(len(r) > T for r in rows):
            raise ValueError(f"T: must be >= every row's length, got T={T}")
        vocab = self.reward.vocab_size
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise ValueError(f"rows: token ids must be in [0, {vocab})")

    @torch.no_grad()
    def log_rewards(self, prompt_index: int, rows: list[list[int]], T: int) -> torch.Tensor:
        """``[len(rows), T + 1]`` float32: entry ``[b, t]`` is ``log p_LM(z_1..z_t STOP | X)``
        for the first t tokens of ``rows[b]`` under the frozen reward LM (not divided by the
        reward temperature; the trainer does that). Entries past a row's length are computed
        on padding and must be masked by the loss."""
        self._check_rows(prompt_index, rows, T)
        prefix, _ = self.reward.score(self.prompt_tokens(prompt_index),
                                      self._padded_rows(rows, T), self.termination_token_id,
                                      T=T, prefix_bias=self.vocab_bias(), fused=self.use_fused)
        return prefix

    def _padded_rows(self, rows: list[list[int]], T: int) -> torch.Tensor:
        """``rows`` right-padded to ``[len(rows), max(T, 1)]``: at least one column (causal:
        a padding column after the last state changes no reward), so the reward LM runs
        the same calls whatever the data (ZeRO-3)."""
        pad = self.pad_token_id
        tokens, _ = ReplayBuffer.to_tensors(rows, pad)
        width = max(T, 1)
        if tokens.shape[1] < width:
            tokens = torch.cat(
                [tokens, tokens.new_full((len(rows), width - tokens.shape[1]), pad)], 1
            )
        return tokens[:, :width]

    @torch.no_grad()
    def sample_log_rewards(
        self,
        model,
        prompt_index: int,
        n: int,
        *,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """``n`` continuations of prompt ``prompt_index`` drawn from ``model`` as the policy
        samples (temperature 1, no exploration; with ``policy_logit_bias``) and their log-rewards
        (``log_rewards``, not tempered): ``(log_rewards [n], rows)``. An evaluation aid: below
        reward temperature 1, training should raise the mean."""
        from fastgfn.trainer.model.loading import eval_mode
        from fastgfn.trainer.sampling.policy import PolicyActions, sample_policy

        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        with eval_mode(model):
            r = sample_policy(
                model, self.prompt_tokens(prompt_index).to(next(model.parameters()).device), n,
                PolicyActions.of(self), max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, generator=generator,
            )
        rows = r.rows()
        lr = self.log_rewards(prompt_index, rows, r.tokens.shape[1])
        return lr.gather(1, r.lengths[:, None].cpu()).squeeze(1), rows

    def evaluate(self, texts: list[str], terminated: list[bool]) -> dict:
        n = max(1, len(texts))
        return {
            "samples": len(texts),
            "terminated_fraction": sum(terminated) / n,
            "distinct": len(set(texts)),
            "mean_chars": sum(len(t) for t in texts) / n,
        }
