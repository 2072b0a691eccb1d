"""Reference for the modified sub-trajectory balance loss (docs/MATH.md §2), in float64.

Written for reading, not speed: it materialises every (i, j) pair of every sequence.
"""

from __future__ import annotations

import math

import torch


def subtb_pair_sums_reference(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence weighted sums over sub-trajectories, computed in float64.

    For sequence b with n = lengths[b] generated tokens and every pair 0 <= i < j <= n:

        res(i, j) = log_r[i] + sum_{k=i}^{j-1} log_pf[k] + log_pterm[j] - log_r[j] - log_pterm[i]
        w(i, j)   = lam ** (j - i - 1)

    Returns ``num[b] = sum w * res**2`` and ``den[b] = sum w``; for lam > 1 both are scaled
    by ``lam ** -(n - 1)`` (the heaviest pair weighs 1, see :func:`pair_sums_log_scale`), so
    that long sequences do not overflow. Positions past n are masked
    with ``where`` (never multiplied), so non-finite padding cannot leak into the result.
    Differentiable with autograd; :func:`subtb_pair_sums_backward_reference` spells the
    gradient out.
    """
    num, den, _ = _pairs(log_pf, log_pterm, log_r, lengths, lam)
    return num, den


def subtb_pair_sums_backward_reference(
    grad_num: torch.Tensor,
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_b grad_num[b] * num[b]``, in float64, written out pair by pair.

    With the potential ``P[j] = sum_{k<j} log_pf[k] + log_pterm[j] - log_r[j]`` each residual
    is ``P[j] - P[i]``, so d num / d P[s] = sum_i 2 w(i, s) res(i, s) - sum_j 2 w(s, j) res(s, j).
    Then d log_pterm[s] = dP[s], d log_r[s] = -dP[s], d log_pf[t] = sum_{s>t} dP[s].
    """
    _, _, (w, res, n) = _pairs(log_pf, log_pterm, log_r, lengths, lam)
    T = log_pf.shape[1]
    coef = 2.0 * grad_num.double()[:, None, None] * w * res  # [B, i, j], zero off the pairs
    d_potential = coef.sum(dim=1) - coef.sum(dim=2)  # as the pair's end j, minus as its start i
    suffix = d_potential.flip(1).cumsum(1).flip(1)  # sum_{s>=t} dP[s]
    d_pf = torch.where(torch.arange(T, device=n.device)[None, :] < n, suffix[:, 1:], 0.0)
    return d_pf, d_potential, -d_potential


def subtb_pair_terms_reference(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_r: torch.Tensor,
    lengths: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, res)``, both ``[B, T+1, T+1]`` float64: the weight ``lam ** (j - i - 1)`` (not
    rescaled) and the residual of every pair ``0 <= i < j <= n`` of every sequence, 0 outside
    its pairs, so that ``sum w * res**2 / sum w`` is the loss's ``"mean"`` reduction and any
    subset of the pairs gives its share of it."""
    _, _, (w, res, _) = _pairs(log_pf, log_pterm, log_r, lengths, lam)
    scale = pair_sums_log_scale(lengths.to(w.device), lam, w.dtype).exp()
    return w * scale[:, None, None], res


def pair_sums_log_scale(lengths: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    """``log`` of the factor that turns the returned ``num, den`` into the plain weighted sums:
    ``(n - 1) log lam`` for lam > 1 (0 for empty sequences), 0 for lam <= 1."""
    if lam <= 1.0:
        return torch.zeros(lengths.shape, dtype=dtype, device=lengths.device)
    return (lengths.to(dtype) - 1.0).clamp(min=0.0) * math.log(lam)


def _pairs(log_pf, log_pterm, log_r, lengths, lam):
    B, T = log_pf.shape
    device = log_pf.device
    n = lengths.to(device=device, dtype=torch.long).clamp(0, T)[:, None]  # [B, 1]
    step = torch.arange(T, device=device)[None, :]
    state = torch.arange(T + 1, device=device)[None, :]
    pf = torch.where(step < n, log_pf.double(), 0.0)
    pterm = torch.where(state <= n, log_pterm.double(), 0.0)
    r = torch.where(state <= n, log_r.double(), 0.0)

    # Cumulative forward log-prob up to each state: F[b, j] = sum_{k<j} log_pf[b, k].
    F = torch.cat([pf.new_zeros(B, 1), pf.cumsum(dim=1)], dim=1)  # [B, T+1]
    # res(i, j) = (F[j] + log_pterm[j] - log_r[j]) - (F[i] + log_pterm[i] - log_r[i])
    potential = F + pterm - r
    res = potential[:, None, :] - potential[:, :, None]  # res[b, i, j]

    i = state.view(1, T + 1, 1)
    j = state.view(1, 1, T + 1)
    pair = (i < j) & (j <= n[:, :, None])  # [B, T+1, T+1]
    exponent = (j - i - 1).clamp(min=0) - (n[:, :, None] - 1).clamp(min=0) * int(lam > 1.0)
    lam64 = torch.tensor(float(lam), dtype=torch.float64)
    w = torch.where(pair, torch.pow(lam64, exponent.double()), 0.0)
    res = torch.where(pair, res, 0.0)
    num = (w * res.square()).sum(dim=(1, 2))
    den = w.sum(dim=(1, 2))
    return num, den, (w, res, n)

