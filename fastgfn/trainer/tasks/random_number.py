"""The random-number task (Hu et al. 2024, section 2).

Prompt: "The following is a random integer drawn uniformly between 0 and 100: ". A
continuation is valid when its text is the canonical decimal form of an integer in
[lo, hi] (no sign, no spaces, no leading zeros) and it is followed by the termination token.
log R = 0 for a valid continuation and ``invalid_log_reward`` otherwise, so the target is
uniform over the hi - lo + 1 values. Every prefix is scored (the modified SubTB lets every
state terminate).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.tasks.base import Task, termination_token
from fastgfn.trainer.tasks.options import TaskOptions

PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "
_CANONICAL = re.compile(r"0|[1-9][0-9]*")


@dataclass
class RandomNumberOptions(TaskOptions):
    prompt: str | None = None  # the prompt (default: PROMPT)
    task_low: int = 0  # the valid integers: task_low..task_high
    task_high: int = 100
    invalid_log_reward: float = -20.0  # log R of a continuation that is not one of them

    FINITE = ("invalid_log_reward",)

    def check(self) -> None:
        super().check()
        if self.task_low > self.task_high:
            raise ConfigError(f"task_low: must be <= task_high ({self.task_high}), got "
                              f"{self.task_low}")


class RandomNumberTask(Task):
    name = "random_number"
    Options = RandomNumberOptions
    description = ("sample an integer uniformly from [{task_low}, {task_high}] after the "
                   "prompt (Hu et al. 2024, section 2)")

    def __init__(
        self,
        tokenizer,
        *,
        prompt: str = PROMPT,
        termination: str = ",",
        low: int = 0,
        high: int = 100,
        invalid_log_reward: float = -20.0,
    ):
        if low > high:
            raise ValueError(f"task_low ({low}) must be <= task_high ({high})")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.low, self.high = low, high
        self.invalid_log_reward = float(invalid_log_reward)
        self.termination_token_id = termination_token(tokenizer, termination)
        self.prompt_ids = torch.tensor(tokenizer.encode(prompt, add_special_tokens=False))
        self._pieces: dict[int, str] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None):
        return cls(
            tokenizer,
            prompt=cfg.task.prompt or PROMPT,
            termination=cfg.task.termination,
            low=cfg.task.task_low,
            high=cfg.task.task_high,
            invalid_log_reward=cfg.task.invalid_log_reward,
        )

    # prompts --------------------------------------------------------------------------
    def num_prompts(self) -> int:
        return 1

    def prompt_tokens(self, index: int) -> torch.Tensor:
        return self.prompt_ids

    def allowed_token_ids(self) -> list[int]:
        """Tokens a valid continuation uses: the single-token digits and the termination."""
        ids = []
        for d in "0123456789":
            enc = self.tokenizer.encode(d, add_special_tokens=False)
            if len(enc) == 1:
                ids.append(int(enc[0]))
        return ids + [self.termination_token_id]

    # reward ---------------------------------------------------------------------------
    def _piece(self, tid: int) -> str:
        s = self._pieces.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid])
            self._pieces[tid] = s
        return s

    def value(self, text: str) -> int | None:
        """The integer a continuation's text denotes when valid, else None."""
        if not _CANONICAL.fullmatch(text):
            return None
        v = int(text)
        return v if self.low <= v <= self.high else None

    def text(self, row: list[int]) -> str:
        return "".join(self._piece(t) for t in row)

    def dead_index(self, row: list[int]) -> int | None:
        """The first t >= 1 whose prefix s_t can no longer become valid (every non-empty
        live prefix here is itself a valid value), or None. Such a state is a dead end: the
        trainer ends the trajectory there, as a forced stop with the invalid reward."""
        text = ""
        for t, tok in enumerate(row, 1):
            text += self._piece(tok)
            if self.value(text) is None:
                return t
        return None

    def log_rewards(self, prompt_index: int, rows: list[list[int]], T: int) -> torch.Tensor:
        """``log R(s_t STOP)`` for every prefix t = 0..T of every row: ``[B, T+1]``."""
        out = torch.full((len(rows), T + 1), self.invalid_log_reward)
        for b, row in enumerate(rows):
            text = ""
            for t in range(min(len(row), T) + 1):
                if t > 0:
                    text += self._piece(row[t - 1])
                if self.value(text) is not None:
                    out[b, t] = 0.0
        return out

    # evaluation -----------------------------------------------------------------------
    def evaluate(self, texts: list[str], terminated: list[bool]) -> dict:
        """Fraction valid, distinct values and KL(empirical over valid values || uniform)."""
        values = [self.value(s) if term else None for s, term in zip(texts, terminated)]
        valid = [v for v in values if v is not None]
        n_vals = self.high - self.low + 1
        counts = Counter(valid)
        kl = float("nan")
        if valid:
            n = len(valid)
            kl = sum((c / n) * math.log((c / n) * n_vals) for c in counts.values())
        return {
            "samples": len(texts),
            "valid_fraction": len(valid) / max(1, len(texts)),
            "distinct_values": len(counts),
            "kl_uniform": kl,
            "counts": {int(k): int(v) for k, v in sorted(counts.items())},
        }

    @torch.no_grad()
    def policy_metrics(self, engine, min_new_tokens: int) -> dict:
        """The exact probability the policy gives each valid value, from one teacher-forced
        pass over all of them: the total valid mass and KL(policy restricted to the valid
        values || uniform)."""
        from fastgfn.trainer.model.loading import eval_mode
        from fastgfn.trainer.replay import ReplayBuffer
        from fastgfn.trainer.scoring import gfn_logprobs

        values = list(range(self.low, self.high + 1))
        rows = [self.tokenizer.encode(str(v), add_special_tokens=False) for v in values]
        tokens, lengths = ReplayBuffer.to_tensors(rows, self.pad_token_id)
        prompt = self.prompt_tokens(0).to(engine.device)
        with eval_mode(engine.module) as model, engine.param_context():
            log_pf, log_pterm = gfn_logprobs(model, prompt, tokens.to(engine.device),
                                             self.termination_token_id)
        mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
        log_pterm = log_pterm.float().cpu()
        logq = (log_pf.float().cpu() * mask).sum(1) + log_pterm.gather(1, lengths[:, None])[:, 0]
        if min_new_tokens >= 1:
            # the sampler forbids stopping at s_0: the first token is drawn from the rest
            logq = logq - torch.log1p(-log_pterm[0, 0].exp().clamp(max=1 - 1e-6))
        cond = torch.softmax(logq, 0)
        kl = float((cond * (cond * len(values)).log()).sum())
        return {"exact_valid_mass": float(logq.exp().sum()), "exact_kl_uniform": kl}
