"""``nn.Module`` wrappers of the functional losses, validating their settings up front."""

from __future__ import annotations

import torch
from torch import nn

from fastgfn._validation import check_positive_number
from fastgfn.backends import check_backend_name
from fastgfn.losses import functional as F


def _checked_reduction(reduction: str) -> str:
    if reduction not in F.REDUCTIONS:
        raise ValueError(f"reduction must be one of {F.REDUCTIONS}, got {reduction!r}")
    return reduction


class SubTBLoss(nn.Module):
    """Modified sub-trajectory balance; see :func:`fastgfn.subtb_loss`."""

    def __init__(self, lam: float = 1.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.lam = check_positive_number("lam", lam)
        self.reduction = _checked_reduction(reduction)
        self.backend = check_backend_name(backend)

    def forward(self, log_pf, log_pterm, log_r, lengths):
        return F.subtb_loss(log_pf, log_pterm, log_r, lengths, self.lam, self.reduction,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, reduction={self.reduction!r}, backend={self.backend!r}"


class DBLoss(nn.Module):
    """Modified detailed balance; see :func:`fastgfn.db_loss`."""

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = _checked_reduction(reduction)
        self.backend = check_backend_name(backend)

    def forward(self, log_pf, log_pterm, log_r, lengths):
        return F.db_loss(log_pf, log_pterm, log_r, lengths, self.reduction, backend=self.backend)


class TBLoss(nn.Module):
    """Trajectory balance owning a learnable log Z: one global value or one per prompt.

    ``forward(..., prompt_ids=None)``: ``prompt_ids`` [B] indexes the log Z table (needed when
    ``num_prompts > 1``).
    """

    def __init__(self, num_prompts: int = 1, init_log_z: float = 0.0, reduction: str = "mean"):
        super().__init__()
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
        self.reduction = _checked_reduction(reduction)
        self.log_z = nn.Parameter(torch.full((num_prompts,), float(init_log_z)))

    def forward(self, log_pf, log_pterm, log_r, lengths, prompt_ids=None):
        if prompt_ids is None:
            if self.log_z.numel() != 1:
                raise ValueError("prompt_ids is required when the TBLoss has several log Z values")
            log_z = self.log_z[0]
        else:
            log_z = self.log_z[prompt_ids]
        return F.tb_loss(log_pf, log_pterm, log_r, lengths, log_z, self.reduction)


class VarGradLoss(nn.Module):
    """VarGrad: log Z estimated per prompt group from the batch (:func:`fastgfn.vargrad_loss`)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = _checked_reduction(reduction)

    def forward(self, log_pf, log_pterm, log_r, lengths, group_ids=None):
        return F.vargrad_loss(log_pf, log_pterm, log_r, lengths, group_ids, self.reduction)
