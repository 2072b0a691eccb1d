"""GFlowNet losses for sequences where every state can terminate (docs/MATH.md §2)."""

from fastgfn.losses.functional import (
    REDUCTIONS,
    db_loss,
    subtb_loss,
    tb_loss,
    trajectory_log_ratio,
    vargrad_log_z,
    vargrad_loss,
)
from fastgfn.losses.modules import DBLoss, SubTBLoss, TBLoss, VarGradLoss

__all__ = [
    "REDUCTIONS",
    "DBLoss",
    "SubTBLoss",
    "TBLoss",
    "VarGradLoss",
    "db_loss",
    "subtb_loss",
    "tb_loss",
    "trajectory_log_ratio",
    "vargrad_log_z",
    "vargrad_loss",
]
