"""Beam search and diverse beam search (Vijayakumar et al. 2016, Hamming diversity) over any
model the sampler can decode (``fastgfn.trainer.sampling.decoding``), one prompt at a time.

transformers 5.x dropped group beam search from ``generate``, so it is written here. The
``num_beams`` beams are split into ``num_groups`` groups of ``K = num_beams / num_groups``.
At every step one forward pass gives the next-token log-probs of all beams; the groups then
choose in order, each doing one step of ordinary beam search on

    score(beam + v) = log p(beam) + log p(v | beam) - diversity_penalty * count_t(v),

where ``count_t(v)`` is how many beams of the earlier groups chose token ``v`` at this step
(Hamming diversity). The penalty only steers the choice: a beam keeps its true log-prob
``log p(beam + v)``, as in the paper's objective (sum of log-probs, no length normalisation,
like ``length_penalty=0`` in transformers). One group is plain beam search; one group of
one beam is greedy decoding.

Per group, as transformers' beam search does: the best ``2K`` candidates are taken in
order; one that picks the termination token (and ranks among the first ``K``) becomes a
finished hypothesis, the others continue until ``K`` beams run. A group stops once it has
``K`` finished hypotheses and its best running beam cannot beat the worst of them (log-probs
only fall, so this is exact); at ``max_new_tokens`` its running beams become unterminated
hypotheses. Each group returns its best ``K``.

Log-probs are those of ``log_softmax(logits + vocab_bias)`` with the termination token
forbidden before ``min_new_tokens`` (the same behaviour policy as the sampler's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgfn.trainer.sampling.decoding import TransformersDecoder


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the termination token
    score: float  # sum of the log-probs of the tokens (and of the termination, if terminated)
    terminated: bool
    group: int


@dataclass
class _Group:
    scores: torch.Tensor  # [K] log-probs of the running beams (-inf: an unused slot)
    tokens: list  # [K] token lists of the running beams
    finished: list  # Hypothesis, best first, at most K
    done: bool = False


def _check(num_beams: int, num_groups: int, max_new_tokens: int, min_new_tokens: int):
    if num_beams < 1 or num_groups < 1 or num_beams % num_groups:
        raise ValueError(
            f"num_groups: must divide num_beams ({num_beams}) and both be >= 1, got {num_groups}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens: must be in [0, max_new_tokens], got {min_new_tokens}")


def _group_step(group: _Group, g: int, logp, counts, penalty, term, K):
    """One beam-search step of one group; returns (parent positions, next tokens) of its K
    running beams (positions within the group)."""
    cand = group.scores[:, None] + logp  # [K, V] true log-probs
    sel = (cand - penalty * counts[None, :]).flatten()
    V = logp.shape[1]
    order = torch.topk(sel, min(2 * K, sel.numel())).indices.tolist()
    parents, nxt = [], []
    for rank, flat in enumerate(order):
        k, v = divmod(flat, V)
        value = float(cand[k, v])
        if value == float("-inf"):
            break
        if v == term:
            if rank < K:
                group.finished.append(Hypothesis(group.tokens[k], value, True, g))
            continue
        parents.append(k)
        nxt.append(v)
        if len(parents) == K:
            break
    group.finished = sorted(group.finished, key=lambda h: -h.score)[:K]
    return parents, nxt, [float(cand[k, v]) for k, v in zip(parents, nxt)]


def _advance(group: _Group, parents, nxt, scores, K) -> None:
    """The group's running beams after a step (unused slots at -inf)."""
    pad = K - len(parents)
    group.tokens = [group.tokens[k] + [v] for k, v in zip(parents, nxt)] + [[]] * pad
    group.scores = torch.tensor(scores + [float("-inf")] * pad)
    best = max(scores, default=float("-inf"))
    if (len(group.finished) >= K and best <= group.finished[-1].score) or not parents:
        group.done = True


@torch.no_grad()
def diverse_beam_search(
    model,
    prompt_ids: torch.Tensor,
    *,
    num_beams: int,
    num_groups: int,
    max_new_tokens: int,
    termination_token_id: int,
    min_new_tokens: int = 0,
    diversity_penalty: float = 1.0,
    vocab_bias: torch.Tensor | None = None,
) -> list[Hypothesis]:
    """``num_beams`` hypotheses continuing ``prompt_ids`` (1-D): the best ``K`` of every group
    in group order, each group's best first (see the module docstring)."""
    _check(num_beams, num_groups, max_new_tokens, min_new_tokens)
    K, term = num_beams // num_groups, termination_token_id
    first = torch.full((K,), float("-inf"))
    first[0] = 0.0  # identical empty beams: only one may expand
    groups = [_Group(first.clone(), [[] for _ in range(K)], []) for _ in range(num_groups)]
    with TransformersDecoder(model).decoding(prompt_ids, num_beams, max_new_tokens) as dec:
        logits = dec.first_logits
        for t in range(max_new_tokens):
            logp = _log_probs(logits, vocab_bias, term if t < min_new_tokens else None)
            counts = torch.zeros(logp.shape[1])
            rows, tokens = [], []
            for g, group in enumerate(groups):
                base = g * K
                if group.done:  # keep its rows in the cache; their outputs are ignored
                    rows += range(base, base + K)
                    tokens += [term] * K
                    continue
                parents, nxt, scores = _group_step(group, g, logp[base:base + K], counts,
                                                   diversity_penalty, term, K)
                _advance(group, parents, nxt, scores, K)
                counts.index_add_(0, torch.tensor(nxt, dtype=torch.long),
                                  torch.ones(len(nxt)))
                fill = K - len(parents)
                rows += [base + k for k in parents] + [base] * fill
                tokens += nxt + [term] * fill
            if t == max_new_tokens - 1 or all(g.done for g in groups):
                break
            dec.keep_rows(torch.tensor(rows, device=logits.device))
            logits = dec.step(torch.tensor(tokens, device=logits.device))
    return _results(groups, K)


def _log_probs(logits, vocab_bias, forbid) -> torch.Tensor:
    z = logits.float().cpu()
    if vocab_bias is not None:
        z = z + vocab_bias.float().cpu()
    if forbid is not None:
        z = z.clone()
        z[:, forbid] = float("-inf")
    return torch.log_softmax(z, dim=-1)


def _results(groups: list[_Group], K: int) -> list[Hypothesis]:
    out = []
    for g, group in enumerate(groups):
        hyps = list(group.finished)
        if not group.done:  # ran out of length: the running beams, unterminated
            hyps += [Hypothesis(toks, float(s), False, g)
                     for toks, s in zip(group.tokens, group.scores.tolist())
                     if s > float("-inf")]
        out += sorted(hyps, key=lambda h: -h.score)[:K]
    return out
