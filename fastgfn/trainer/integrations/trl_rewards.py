"""Reward functions in TRL's convention, read as log-rewards.

A reward function is a plain callable ``f(prompts, completions, completion_ids, **kwargs) ->
list[float | None]``, called with keyword arguments: the prompts, the decoded completions
(conversational prompts get ``[{"role": "assistant", "content": text}]``), the completion
token ids, every other dataset column as a list, ``trainer_state`` and ``log_metric(name,
value)``. It returns one value per completion; ``None`` means "not applicable" and drops that
function for that completion. The weighted sum over the functions is the completion's
**log**-reward ``log R(z)``.

For SubTB and DB (``loss="subtb"`` or ``"db"``) the losses need the log-reward of every prefix
``z_1..z_t`` (the completion that stops there); the same functions score all of them in one
call, so a completion of n tokens costs n + 1 reward evaluations instead of one.
"""

from __future__ import annotations

import inspect
import math

import torch


def check_reward_funcs(reward_funcs, weights) -> tuple[list, list[str], torch.Tensor]:
    """(functions, names, weights [F]); a ``TypeError`` or ``ValueError`` names the bad one."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs: give at least one reward function")
    names = []
    for i, f in enumerate(funcs):
        if isinstance(f, (str, torch.nn.Module)) or not callable(f):
            raise TypeError(
                f"reward_funcs[{i}]: must be a plain callable returning one log-reward per "
                f"completion (reward models are not supported), got {type(f).__name__}")
        if inspect.iscoroutinefunction(f):
            raise TypeError(f"reward_funcs[{i}]: async reward functions are not supported")
        names.append(getattr(f, "__name__", type(f).__name__))
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights: {len(weights)} weights for {len(funcs)} reward "
                         "functions")
    return funcs, names, torch.tensor([float(w) for w in weights], dtype=torch.float64)


def _values(name: str, out, n: int) -> torch.Tensor:
    out = list(out)
    if len(out) != n:
        raise ValueError(f"reward function {name!r} returned {len(out)} rewards for {n} "
                         "completions (one per completion)")
    vals = []
    for r in out:
        v = math.nan if r is None else float(r)
        if r is not None and not math.isfinite(v):
            raise ValueError(f"reward function {name!r} returned {v}: log-rewards must be "
                             "finite (use a large negative value for an unwanted completion)")
        vals.append(v)
    return torch.tensor(vals, dtype=torch.float64)


def log_rewards(funcs, names, weights, *, prompts, completions, completion_ids,
                columns: dict, **extra) -> torch.Tensor:
    """``[N]`` float64 log-rewards: the weighted sum of the functions' values (``None``
    skipped); a completion that every function skips is a ``ValueError``."""
    n = len(completions)
    table = torch.empty(n, len(funcs), dtype=torch.float64)
    for i, (f, name) in enumerate(zip(funcs, names)):
        out = f(prompts=prompts, completions=completions, completion_ids=completion_ids,
                **columns, **extra)
        table[:, i] = _values(name, out, n)
    skipped = torch.isnan(table).all(1)
    if skipped.any():
        k = int(skipped.nonzero()[0, 0])
        raise ValueError(f"every reward function returned None for completion {k} "
                         f"({completions[k]!r} after {prompts[k]!r})")
    return (table * weights).nansum(1)


def prefixes(rows: list[list[int]], every_prefix: bool) -> tuple[list[list[int]], list[tuple]]:
    """The completions to score and where each value goes in the ``[B, T + 1]`` table: every
    prefix ``row[:t]`` (t = 0..len) of every row, or each whole row at its length."""
    flat, where = [], []
    for b, row in enumerate(rows):
        ts = range(len(row) + 1) if every_prefix else [len(row)]
        for t in ts:
            flat.append(row[:t])
            where.append((b, t))
    return flat, where


def scatter(values: torch.Tensor, where: list[tuple], batch: int, width: int) -> torch.Tensor:
    """``[B, width + 1]`` float32 table of ``values`` at ``where`` (0 elsewhere: never read)."""
    out = torch.zeros(batch, width + 1, dtype=torch.float64)
    if where:
        b, t = zip(*where)
        out[list(b), list(t)] = values
    return out.float()
