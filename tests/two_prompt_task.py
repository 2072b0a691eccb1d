"""A task with two prompts whose partition functions differ by 6 nats, small enough to
enumerate (continuations of 1-2 tokens), for tests of the per-prompt objective."""

import torch

from fastgfn.trainer.tasks.base import Task

ALPHABET = "0123"
OFFSET = 6.0  # log Z(prompt 1) - log Z(prompt 0), up to the tables' own difference
OTHER = -30.0  # log-reward of a continuation with a token outside the alphabet


class TwoPromptTask(Task):
    name = "two_prompts"

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.termination_token_id = tokenizer.encode(".")[0]
        self.prompts = [torch.tensor(tokenizer.encode("ab")), torch.tensor(tokenizer.encode("xy"))]
        self.alphabet = [tokenizer.encode(c)[0] for c in ALPHABET]
        g = torch.Generator().manual_seed(seed)
        n = len(ALPHABET)
        # log R of each 1- and 2-token continuation over the alphabet, per prompt
        self.table = [
            {"one": 1.5 * torch.randn(n, generator=g) + k * OFFSET,
             "two": 1.5 * torch.randn(n, n, generator=g) + k * OFFSET}
            for k in range(2)
        ]

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None):
        return cls(tokenizer)

    def num_prompts(self) -> int:
        return 2

    def prompt_tokens(self, index: int) -> torch.Tensor:
        return self.prompts[index]

    def allowed_token_ids(self) -> list[int]:
        return self.alphabet + [self.termination_token_id]

    def log_reward(self, prompt_index: int, prefix: list[int]) -> float:
        """log R(prefix STOP | prompt); the empty prefix and other tokens get OTHER."""
        if not prefix or len(prefix) > 2 or any(t not in self.alphabet for t in prefix):
            return OTHER
        idx = [self.alphabet.index(t) for t in prefix]
        table = self.table[prompt_index]
        return float(table["one"][idx[0]] if len(idx) == 1 else table["two"][idx[0], idx[1]])

    def log_rewards(self, prompt_index, rows, T):
        out = torch.full((len(rows), T + 1), OTHER)
        for b, row in enumerate(rows):
            for t in range(len(row) + 1):
                out[b, t] = self.log_reward(prompt_index, row[:t])
        return out


def exact_kl(policy, task, prompt_index: int) -> float:
    """KL(p(z | X) || q(z | X)) over every continuation of 1 or 2 tokens: p the normalised
    reward, q the policy's terminating distribution reach(z) q(STOP | z), normalised (the
    sampler forbids stopping at the empty state)."""
    import itertools

    from fastgfn.trainer.scoring import gfn_logprobs

    V, term = policy.config.vocab_size, task.termination_token_id
    toks = [i for i in range(V) if i != term]
    pairs = torch.tensor(list(itertools.product(toks, toks)))
    with torch.no_grad():
        log_pf, log_pterm = gfn_logprobs(policy.eval(), task.prompt_tokens(prompt_index), pairs,
                                         term)
    log_pf, log_pterm = log_pf.double(), log_pterm.double()
    first = pairs[:, 1] == toks[0]
    logq = torch.cat([(log_pf[:, 0] + log_pterm[:, 1])[first],
                      log_pf[:, 0] + log_pf[:, 1] + log_pterm[:, 2]])
    logr = torch.tensor([task.log_reward(prompt_index, [int(p[0])]) for p in pairs[first]] +
                        [task.log_reward(prompt_index, p.tolist()) for p in pairs],
                        dtype=torch.float64)
    logp, logq = torch.log_softmax(logr, 0), torch.log_softmax(logq, 0)
    return float((logp.exp() * (logp - logq)).sum())


def log_partition(task, prompt_index: int) -> float:
    values = [task.log_reward(prompt_index, [a]) for a in task.alphabet]
    values += [task.log_reward(prompt_index, [a, b]) for a in task.alphabet for b in task.alphabet]
    return float(torch.logsumexp(torch.tensor(values), 0))
