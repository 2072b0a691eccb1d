"""Where step metrics go (rank 0 only): ``<output_dir>/metrics.jsonl``, one JSON object per
line, and TensorBoard under ``<output_dir>/tensorboard`` when it is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, cfg, out: Path, active: bool):
        self.active = active
        self.fh = None
        self.tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.fh = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_prefixed(self, step: int, prefix: str, metrics: dict) -> None:
        """The numeric entries of ``metrics`` under ``prefix/``."""
        self.log(step, {f"{prefix}/{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()
