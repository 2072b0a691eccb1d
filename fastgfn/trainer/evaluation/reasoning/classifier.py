"""Scoring and training label classifiers on contexts, with or without a rationale.

A context is token ids ending where the answer text starts: ``X z STOP`` (a rationale z
written after the prompt X and closed by the termination token) or ``X STOP`` (the empty
rationale). For choices c with answer texts ``Y_c``,

    score(context, c) = log p_LM(Y_c | prefix context)                         (1)

summed over the tokens of ``Y_c``, with an optional ``prefix`` (few-shot demonstrations)
before every context. A classifier predicts the choice with the largest score; training
one (the paper's M-step and its supervised baseline) minimises the cross-entropy of the
right choice among the choices,

    loss = - log softmax_c score(context, c) [label]                          (2)

averaged over a batch of (context, label) pairs drawn with replacement.

Every sequence ``prefix context Y_c`` runs once through the decoder, right-padded (padding
after a sequence's last token changes nothing before it); the log-probs of the ``Y_c`` tokens
come through the fused lm_head op at the states that predict them, so no ``[*, V]`` logits
exist. The prefix, when given, runs once per batch and its KV cache is shared by the rows
(views, no copy).
"""

from __future__ import annotations

import torch

from fastgfn.lm_logprobs import lm_head_logprobs
from fastgfn.trainer.model.kv_cache import cache_kwarg, expand_cache, output_cache


def choice_scores(model, contexts: list[list[int]], choice_ids: list[list[int]], *,
                  prefix: list[int] | None = None, pad_token_id: int = 0,
                  fused: bool = True) -> torch.Tensor:
    """``[len(contexts), len(choices)]`` float32 scores (1) of one batch, differentiable
    through ``model`` when grad mode is on."""
    if not contexts or not choice_ids:
        raise ValueError("contexts and choice_ids must not be empty")
    if any(not c for c in contexts) and not prefix:
        raise ValueError("contexts: an empty context needs a prefix")
    if any(not y for y in choice_ids):
        raise ValueError("choice_ids: every choice needs at least one token")
    dev = next(model.parameters()).device
    seqs = [ctx + y for ctx in contexts for y in choice_ids]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    decoder = model.get_decoder()
    kwargs = {}
    if prefix:
        out = decoder(input_ids=torch.tensor([prefix], device=dev), use_cache=True)
        kwargs[cache_kwarg(model)] = expand_cache(output_cache(out), len(seqs))
    h = decoder(input_ids=ids.to(dev), use_cache=bool(prefix), **kwargs).last_hidden_state
    if prefix:  # the prefix's last state predicts each context's first token
        h = torch.cat([out.last_hidden_state[:, -1:].expand(len(seqs), 1, -1), h], 1)
    # Y_c[k] sits at position len(ctx) + k of its sequence; the state before it is at that
    # index of h with the prefix's state in front, one earlier without
    shift = 0 if prefix else -1
    rows, cols, targets = [], [], []
    for i, ctx in enumerate(contexts):
        for c, y in enumerate(choice_ids):
            for k, tok in enumerate(y):
                rows.append(i * len(choice_ids) + c)
                cols.append(len(ctx) + k + shift)
                targets.append(tok)
    rows_t = torch.tensor(rows, device=dev)
    states = h[rows_t, torch.tensor(cols, device=dev)]
    logp = lm_head_logprobs(model, states, torch.tensor(targets, device=dev), [],
                            fused=fused).logp.float()
    scores = torch.zeros(len(seqs), device=dev, dtype=torch.float32).index_add(0, rows_t, logp)
    return scores.view(len(contexts), len(choice_ids))


@torch.no_grad()
def predict(model, contexts: list[list[int]], choice_ids: list[list[int]], *,
            prefix: list[int] | None = None, batch_size: int = 32, pad_token_id: int = 0,
            fused: bool = True) -> torch.Tensor:
    """Scores (1) of every context, ``[len(contexts), len(choices)]`` on the CPU, in batches
    of ``batch_size`` contexts."""
    out = [choice_scores(model, contexts[i:i + batch_size], choice_ids, prefix=prefix,
                         pad_token_id=pad_token_id, fused=fused).cpu()
           for i in range(0, len(contexts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(choice_ids))


def train_classifier(model, contexts: list[list[int]], labels: list[int],
                     choice_ids: list[list[int]], *, steps: int, batch_size: int, lr: float,
                     generator: torch.Generator, pad_token_id: int = 0,
                     weight_decay: float = 0.0) -> list[float]:
    """Minimise (2) over ``(contexts[i], labels[i])``, ``batch_size`` pairs drawn with
    replacement per step, ``steps`` AdamW steps at ``lr`` (full-parameter, in place); the
    losses, one per step."""
    if len(contexts) != len(labels) or not contexts:
        raise ValueError(f"labels: need one per context ({len(contexts)}), got {len(labels)}")
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps >= 0, batch_size >= 1 and lr > 0 needed, got {steps}, "
                         f"{batch_size}, {lr}")
    bad = [y for y in labels if not 0 <= y < len(choice_ids)]
    if bad:
        raise ValueError(f"labels: {bad[0]} is not a choice index (0..{len(choice_ids) - 1})")
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    dev = next(model.parameters()).device
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(contexts), (batch_size,), generator=generator).tolist()
        scores = choice_scores(model, [contexts[i] for i in idx], choice_ids,
                               pad_token_id=pad_token_id)
        target = torch.tensor([labels[i] for i in idx], device=dev)
        loss = torch.nn.functional.cross_entropy(scores, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    return losses
