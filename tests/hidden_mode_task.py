"""A task whose reward hides its mode where on-policy exploration does not look: one prompt,
continuations of up to ``LENGTH`` tokens over a 4-letter alphabet, log-reward 0 for the one
continuation ``MODE`` and ``ELSEWHERE`` for every other (its prefixes included: like a worked
arithmetic rationale, it pays only when complete and stopped right after), so that the mode
holds nearly all of the target's mass. The policy's vocabulary is the alphabet and the
termination token (``policy_logit_bias``), as the arithmetic task's is its digits and signs.
A tiny random policy samples the mode with probability about 1e-4 (6 tokens in a row among 5,
and no early stop); the task knows it as its worked continuation (``worked_rows``), which
``replay_seed`` puts into the buffer."""

import itertools

import torch

from fastgfn.trainer.tasks.base import Task

ALPHABET = "0123"
MODE = "312031"
LENGTH = len(MODE)
ELSEWHERE = -12.0


class HiddenModeTask(Task):
    name = "hidden_mode"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.termination_token_id = tokenizer.encode(".")[0]
        self.prompt = torch.tensor(tokenizer.encode("ab"))
        self.alphabet = [tokenizer.encode(c)[0] for c in ALPHABET]
        self.mode = [tokenizer.encode(c)[0] for c in MODE]

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None):
        return cls(tokenizer)

    def num_prompts(self) -> int:
        return 1

    def prompt_tokens(self, index: int) -> torch.Tensor:
        return self.prompt

    def policy_logit_bias(self):
        bias = torch.full((len(self.tokenizer),), -99.0)
        bias[self.alphabet + [self.termination_token_id]] = 0.0
        return bias

    def worked_rows(self):
        return [(list(self.mode), [True] * LENGTH)]

    def log_reward(self, prefix: list[int]) -> float:
        return 0.0 if list(prefix) == self.mode else ELSEWHERE

    def log_rewards(self, prompt_index, rows, T):
        out = torch.full((len(rows), T + 1), ELSEWHERE)
        for b, row in enumerate(rows):
            for t in range(len(row) + 1):
                out[b, t] = self.log_reward(row[:t])
        return out


def exact_kl(policy, task) -> tuple[float, float]:
    """``(KL(p || q), q's mass on the mode)`` over every continuation of 0..LENGTH alphabet
    tokens: p the normalised reward, q the sampler's distribution (the policy with its
    vocabulary bias, a forced end at LENGTH actions), which sums to 1 over them."""
    from fastgfn.trainer.scoring import gfn_logprobs

    rows = [list(z) for n in range(LENGTH + 1)
            for z in itertools.product(task.alphabet, repeat=n)]
    tokens = torch.zeros(len(rows), LENGTH, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r)
    n = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        pf, pt = gfn_logprobs(policy.eval(), task.prompt, tokens, task.termination_token_id,
                              vocab_bias=task.policy_logit_bias())
    pf, pt = pf.double(), pt.double()
    act = torch.arange(LENGTH)[None] < n[:, None]
    end = torch.where(n == LENGTH, 0.0, pt.gather(1, n[:, None]).squeeze(1))
    log_q = (pf * act).sum(1) + end
    assert abs(float(log_q.exp().sum()) - 1.0) < 1e-3, "the enumeration is complete"
    log_p = torch.log_softmax(torch.tensor([task.log_reward(r) for r in rows],
                                           dtype=torch.float64), 0)
    mode = rows.index(task.mode)
    return float((log_p.exp() * (log_p - log_q)).sum()), float(log_q[mode].exp())
