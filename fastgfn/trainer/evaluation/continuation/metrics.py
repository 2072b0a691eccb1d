"""The two axes of the continuation table (paper section 4.1).

- Log-likelihood of a continuation z under the frozen base LM, with the termination token:
  ``log p(z STOP | X)``, computed by ``ContinuationTask.log_rewards`` (the reward the trainer
  uses, before the reward temperature). With the task's ``illegal_token_bias`` it is exactly
  the reward; with the bias 0 it is the plain LM's log-likelihood. Per prompt, the max and
  the mean over its samples; the table averages them over prompts.
- Diversity of one prompt's samples: ``1 - mean cosine similarity`` of their sentence
  embeddings over all pairs i < j (the paper's definition); the table averages it over
  prompts. Undefined for fewer than two samples (greedy decoding).
"""

from __future__ import annotations

import torch


def sample_log_likelihoods(task, prompt_index: int, rows: list[list[int]]) -> torch.Tensor:
    """``[len(rows)]`` float32: ``log p(z STOP | X)`` of every row under ``task``'s reward LM."""
    if not rows:
        raise ValueError("rows: need at least one continuation")
    T = max(len(r) for r in rows)
    lr = task.log_rewards(prompt_index, rows, T)
    lengths = torch.tensor([len(r) for r in rows])
    return lr.gather(1, lengths[:, None]).squeeze(1)


def diversity(embeddings: torch.Tensor) -> float | None:
    """``1 -`` the mean pairwise cosine similarity of the rows of ``embeddings [n, D]`` (pairs
    i < j), or None for n < 2."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    i, j = torch.triu_indices(n, n, offset=1)
    return float(1.0 - (e[i] * e[j]).sum(-1).mean())


def prompt_metrics(ll: torch.Tensor, ll_plain: torch.Tensor, div: float | None,
                   rows: list[list[int]], terminated: list[bool]) -> dict:
    """One method's metrics on one prompt's samples."""
    return {
        "max_ll": float(ll.max()), "mean_ll": float(ll.mean()),
        "max_ll_plain": float(ll_plain.max()), "mean_ll_plain": float(ll_plain.mean()),
        "diversity": div,
        "samples": len(rows), "not_terminated": sum(not t for t in terminated),
        "distinct": len({tuple(r) for r in rows}),
        "mean_tokens": sum(len(r) for r in rows) / len(rows),
    }


def average(per_prompt: list[dict]) -> dict:
    """The mean of every metric over prompts (counts summed; diversity None if undefined)."""
    out = {}
    for key in per_prompt[0]:
        values = [p[key] for p in per_prompt]
        if key in ("samples", "not_terminated"):
            out[key] = sum(values)
        elif any(v is None for v in values):
            out[key] = None
        else:
            out[key] = sum(values) / len(values)
    out["prompts"] = len(per_prompt)
    return out
