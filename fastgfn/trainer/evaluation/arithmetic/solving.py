"""Decoding rationales with the tool and reading their answers.

``solve_many`` draws, for each of several questions whose prompts have one length, ``1 + k``
rows in a single rollout (a prompt per row): the question's row 0 decoded greedily, its rows
1..k sampled at ``temperature`` (the paper's 0.1), every row with the task's tool and its
policy logit bias (the vocabulary constraint; ``ArithmeticTask.decode``); each rationale's
answer is ``tasks.arithmetic.final_answer``. The greedy answer is row 0's; the majority
answer is the most frequent answer among rows 1..k that have one (ties: the one that
appeared first).
"""

from __future__ import annotations

from collections import Counter

import torch


def majority(answers: list) -> int | None:
    """The most frequent answer that is not None (ties: the first to appear), or None."""
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


def solve_many(model, task, prompts: list[torch.Tensor], *, k: int, temperature: float,
               max_new_tokens: int, min_new_tokens: int = 1, generator=None) -> list[dict]:
    """Greedy and majority-vote answers to each question (see the module docstring), one dict
    per prompt: ``{"greedy", "majority", "texts", "answers", "terminated", "actions"}``.
    ``prompts`` (1-D, all of one length) go into one rollout of ``len(prompts) * (1 + k)``
    rows, question q's rows together."""
    if not prompts:
        return []
    if len({p.numel() for p in prompts}) != 1:
        raise ValueError("prompts: solve_many needs prompts of one length; group them first")
    per = 1 + k
    ids = torch.stack(prompts).repeat_interleave(per, dim=0)
    temps = torch.tensor([0.0] + [float(temperature)] * k).repeat(len(prompts))
    r, texts, answers = task.decode(model, ids, temps, max_new_tokens=max_new_tokens,
                                    min_new_tokens=min_new_tokens, generator=generator)
    stopped, actions = r.terminated.tolist(), r.num_actions.tolist()
    out = []
    for q in range(len(prompts)):
        s = slice(q * per, (q + 1) * per)
        out.append({"greedy": answers[s][0], "majority": majority(answers[s][1:]),
                    "texts": texts[s], "answers": answers[s], "terminated": stopped[s],
                    "actions": actions[s]})
    return out
