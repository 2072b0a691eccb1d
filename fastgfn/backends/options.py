"""The per-call constants of the log-prob ops, passed to every backend as one object."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch


@dataclasses.dataclass(frozen=True)
class LogProbOptions:
    """What is constant over one call of a per-token log-prob op (docs/MATH.md §1).

    ``softcap`` 0 means no softcap (the registered ops' schema has no optional float).
    """

    temperature: float = 1.0
    softcap: float = 0.0
    ignore_index: int = -100
    need_entropy: bool = False

    @property
    def softcap_or_none(self) -> float | None:
        return self.softcap if self.softcap > 0.0 else None


class OutputGrads(NamedTuple):
    """Upstream gradients of the four outputs; ``entropy`` is None when it was not computed."""

    logp: torch.Tensor
    extra: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor


class GradsNeeded(NamedTuple):
    """Which gradients the fused-linear backward computes (the others come back empty)."""

    hidden: bool
    weight: bool
    bias: bool
