"""Functional GFlowNet losses: modified SubTB, modified DB, TB with log Z, VarGrad.

Shapes, for a batch of B sequences padded to T generated tokens:

- ``log_pf``    [B, T]    log q(z_{t+1} | s_t): the policy's log-prob of each generated token;
- ``log_pterm`` [B, T+1]  log q(STOP | s_t): the policy's log-prob of terminating at state s_t;
- ``log_r``     [B, T+1]  log R(s_t STOP), already divided by the reward temperature;
- ``lengths``   [B]       n_b, the number of generated tokens before termination (0..T).

Values past a sequence's length are never read, so padding may hold anything (even NaN);
its gradient is exactly zero. Inputs may be fp16, bf16, fp32 or fp64 (mixed is fine);
accumulation is fp32 at least (fp64 when any input is fp64) and the loss has that dtype.
Non-finite values *inside* a sequence make that sequence's loss non-finite (inf or NaN)
and leave the other sequences' values untouched; the kernels never fault on them.
"""

from __future__ import annotations

import torch

from fastgfn._validation import (
    as_index_tensor,
    check_float,
    check_positive_number,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_allowed,
)
from fastgfn.backends import resolve_backend
from fastgfn.ops.subtb import subtb_pair_sums
from fastgfn.reference.subtb import pair_sums_log_scale

REDUCTIONS = ("mean", "seq_mean", "sum", "none")


def _check_trajectories(log_pf, log_pterm, log_r, lengths):
    """Validate the common inputs; return lengths as an integer tensor on the inputs' device."""
    check_tensor("log_pf", log_pf, ndim=2)
    check_float("log_pf", log_pf)
    B, T = log_pf.shape
    check_tensor("log_pterm", log_pterm)
    check_float("log_pterm", log_pterm)
    check_shape("log_pterm", log_pterm, (B, T + 1))
    check_tensor("log_r", log_r)
    check_float("log_r", log_r)
    check_shape("log_r", log_r, (B, T + 1))
    lengths = as_index_tensor("lengths", lengths, log_pf.device)
    check_shape("lengths", lengths, (B,))
    check_same_device("log_pf", log_pf, log_pterm=log_pterm, log_r=log_r, lengths=lengths)
    if value_checks_allowed(lengths) and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
    return lengths


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce_pair_sums(num, den, reduction: str, lengths, lam: float) -> torch.Tensor:
    """Reduce the op's per-sequence sums. For lam > 1 they come scaled by lam^-(n_b - 1)
    (docs/MATH.md §2); "mean" and "sum" put that factor back in log space."""
    if lam > 1.0 and reduction in ("mean", "sum"):
        log_scale = pair_sums_log_scale(lengths, lam, num.dtype)
        if reduction == "sum":  # may exceed the float range: then inf, as the sum itself
            return (num * log_scale.exp()).sum()
        top = log_scale.max() if log_scale.numel() else log_scale.sum()
        weight = (log_scale - top).exp()  # the longest sequences weigh 1
        num, den = num * weight, den * weight
    # den >= 1 for every sequence with at least one pair (the pair (i, i+1) has weight 1, for
    # lam > 1 the pair (0, n)), and den == 0 exactly for empty sequences, so clamp(min=1) is
    # exact and maps 0/0 to 0; in "mean" the longest sequence has weight 1.
    if reduction == "mean":  # the paper: one weighted mean over all pairs of the batch
        return num.sum() / den.sum().clamp(min=1.0)
    per_sequence = num / den.clamp(min=1.0)
    if reduction == "none":
        return per_sequence
    if reduction == "sum":
        return num.sum()
    nonempty = (den > 0).sum().clamp(min=1)  # seq_mean: mean over sequences with a pair
    return per_sequence.sum() / nonempty


def subtb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float = 1.0,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Modified sub-trajectory balance loss (every state can terminate).

    For each sequence and every pair of states ``0 <= i < j <= n``::

        res(i, j) = log_r[i] + sum_{k=i}^{j-1} log_pf[k] + log_pterm[j] - log_r[j] - log_pterm[i]

    weighted by ``lam ** (j - i - 1)`` (lam > 1 weighs long sub-trajectories more; the
    kernels then work relative to the heaviest pair, so long sequences do not overflow).
    Reductions:

    - ``"mean"`` (default, the paper's): ``sum_b sum_ij w res^2 / sum_b sum_ij w``;
    - ``"seq_mean"``: each sequence normalised by its own weight sum, averaged over the
      sequences that have at least one pair;
    - ``"sum"``: ``sum_b sum_ij w res^2`` (with lam > 1 it can exceed the float range: inf);
    - ``"none"``: the per-sequence normalised values, shape [B] (0 for empty sequences).

    ``backend``: 'auto' (Triton on CUDA, C++ on CPU), 'reference', 'cpp' or 'triton'.
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    lam = check_positive_number("lam", lam)
    _check_reduction(reduction)
    backend = resolve_backend(backend, log_pf.device)
    num, den = subtb_pair_sums(log_pf, log_pterm, log_r, lengths, lam, backend)
    return _reduce_pair_sums(num, den, reduction, lengths, lam)


def db_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Modified detailed balance: only the one-step pairs (i, i+1).

    ``res(i, i+1) = log_r[i] + log_pf[i] + log_pterm[i+1] - log_r[i+1] - log_pterm[i]``; this is
    SubTB in the limit lam -> 0 (weight ``0 ** 0 = 1`` for one-step pairs, 0 for longer ones)
    and runs through the same kernels. Reductions as in :func:`subtb_loss`.
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    _check_reduction(reduction)
    backend = resolve_backend(backend, log_pf.device)
    num, den = subtb_pair_sums(log_pf, log_pterm, log_r, lengths, 0.0, backend)
    return _reduce_pair_sums(num, den, reduction, lengths, 0.0)


def trajectory_log_ratio(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """``sum_{t<n} log_pf[t] + log_pterm[n] - log_r[n]`` per sequence, fp32 (fp64 if any input is).

    The log of q(Z STOP) / R(Z) for each complete trajectory: TB's residual without log Z.
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    return _trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)


def _trajectory_log_ratio(log_pf, log_pterm, log_r, lengths):
    dtype = torch.float32
    for t in (log_pf, log_pterm, log_r):
        dtype = torch.promote_types(dtype, t.dtype)
    T = log_pf.shape[1]
    n = lengths.to(torch.long).clamp(0, T)
    steps = torch.arange(T, device=log_pf.device)[None, :]
    pf_sum = torch.where(steps < n[:, None], log_pf.to(dtype), 0.0).sum(dim=1)
    last = n[:, None]
    pterm_end = log_pterm.gather(1, last).squeeze(1).to(dtype)
    return pf_sum + pterm_end - log_r.gather(1, last).squeeze(1).to(dtype)


def _reduce_per_sequence(per_sequence: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction in ("mean", "seq_mean"):
        return per_sequence.mean() if per_sequence.numel() else per_sequence.sum()
    if reduction == "sum":
        return per_sequence.sum()
    return per_sequence


def tb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    log_z: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Trajectory balance with a learned log partition function.

    ``res_b = log_z_b + sum_{t<n} log_pf[t] + log_pterm[n] - log_r[n]``, loss ``res_b ** 2``.
    ``log_z``: a scalar tensor (one global log Z) or [B] (e.g. ``log_z_table[prompt_ids]``);
    its gradient flows. ``"mean"`` and ``"seq_mean"`` average over sequences.
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    _check_reduction(reduction)
    check_tensor("log_z", log_z)
    check_float("log_z", log_z)
    B = log_pf.shape[0]
    if log_z.dim() > 1 or (log_z.dim() == 1 and log_z.shape[0] != B):
        raise ValueError(f"log_z must be a scalar or have shape ({B},), got {tuple(log_z.shape)}")
    check_same_device("log_pf", log_pf, log_z=log_z)
    residual = log_z + _trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)
    return _reduce_per_sequence(residual.square(), reduction)


def _same_group(group_ids, B: int, device) -> torch.Tensor | None:
    """[B, B] boolean matrix: do sequences a and b share a group? None means one group.

    A pairwise comparison instead of ``torch.unique`` keeps the op free of host syncs on GPUs.
    """
    if group_ids is None:
        return None
    group_ids = as_index_tensor("group_ids", group_ids, device)
    check_shape("group_ids", group_ids, (B,))
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device}, expected {device}")
    return group_ids[:, None] == group_ids[None, :]


def _group_mean(values: torch.Tensor, same: torch.Tensor | None):
    """For each sequence, the mean of the *finite* ``values`` of its group, and their count.

    Non-finite values are left out of every mean (docs/MATH.md §2, VarGrad); a group without
    a finite value gets mean 0 and count 0. Every step keeps NaN out of the backward too
    (``where`` instead of products with a 0/1 mask, a count of at least 1).
    """
    finite = torch.isfinite(values)
    clean = torch.where(finite, values, torch.zeros((), dtype=values.dtype))
    weight = finite.to(values.dtype)
    if same is None:
        total, count = clean.sum().expand_as(values), weight.sum().expand_as(values)
    else:
        same = same.to(values.dtype)
        total, count = same @ clean, same @ weight
    return total / count.clamp(min=1.0), count


def vargrad_log_z(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch estimate of log Z for each sequence's group: ``mean_group(log_r - log q)``.

    The mean runs over the group's sequences with a finite log ratio; a group with none gets
    NaN.
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    ratio = _trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)
    mean, count = _group_mean(ratio, _same_group(group_ids, ratio.shape[0], ratio.device))
    return torch.where(count > 0, -mean, torch.full((), torch.nan, dtype=mean.dtype))


def vargrad_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """VarGrad: TB with log Z replaced by its batch estimate within each prompt group.

    With ``x_b = sum log_pf + log_pterm[n] - log_r[n]`` and the group mean ``xbar``, the
    per-sequence loss is ``(x_b - xbar_group(b)) ** 2`` (the batch variance of the log ratio;
    a group of one sequence contributes 0). ``group_ids`` [B] (any integers) marks sequences
    that share a prompt; None puts the whole batch in one group.

    Non-finite log ratios: ``xbar`` is the mean over the group's *finite* ``x`` only. A
    sequence with a non-finite ``x`` has a non-finite loss (so do the ``"mean"`` and ``"sum"``
    reductions); every other sequence of its group gets the value and the gradient it would
    have in the batch without that sequence (docs/MATH.md §2).
    """
    lengths = _check_trajectories(log_pf, log_pterm, log_r, lengths)
    _check_reduction(reduction)
    ratio = _trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)
    mean, _ = _group_mean(ratio, _same_group(group_ids, ratio.shape[0], ratio.device))
    # A non-finite row sees the group mean as a constant: its NaN gradient stays its own.
    deviation = torch.where(torch.isfinite(ratio), ratio - mean, ratio - mean.detach())
    return _reduce_per_sequence(deviation.square(), reduction)
