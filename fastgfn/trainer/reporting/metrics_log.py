"""Where step metrics go (rank 0 only): ``<output_dir>/metrics.jsonl`` always, one JSON object
per line, and the logging targets of ``report_to`` (the Hugging Face convention): ``none``
(the default), ``tensorboard`` (event files under ``<output_dir>/tensorboard``), ``wandb``
(Weights & Biases; the run lives under ``$WANDB_DIR``, default ``<output_dir>``, in the
project ``$WANDB_PROJECT``, default ``fastgfn``; ``WANDB_MODE=offline`` needs no network),
or several (``report_to=tensorboard,wandb`` or a YAML list). A target whose package is not
installed stops the run at config load (``ConfigError``), never a silent skip.

The old ``tensorboard=true/false`` key still works, with a ``FutureWarning``: it adds or
removes the ``tensorboard`` target."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

from fastgfn.trainer.errors import ConfigError

TARGETS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # target -> the package it needs


def resolve_report_to(cfg) -> list[str]:
    """``cfg.run.report_to`` as a list of targets (``[]`` for none), the deprecated ``tensorboard``
    key folded in; every target known and installed, else ``ConfigError``. Stores the result
    back in ``cfg`` (``cfg.run.tensorboard`` becomes None)."""
    targets = cfg.run.report_to
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = [str(t) for t in (targets or [])]
    if "none" in targets:
        if len(targets) > 1:
            raise ConfigError(f"report_to: 'none' cannot be combined with other targets, got "
                              f"{targets}")
        targets = []
    if cfg.run.tensorboard is not None:
        warnings.warn("tensorboard=true/false is deprecated: use report_to=tensorboard (or "
                      "report_to=none)", FutureWarning, stacklevel=2)
        targets = [t for t in targets if t != "tensorboard"]
        targets += ["tensorboard"] if cfg.run.tensorboard else []
        cfg.run.tensorboard = None
    for t in targets:
        if t not in TARGETS:
            raise ConfigError(f"report_to: unknown logging target {t!r}; choose from none, "
                              f"{', '.join(TARGETS)} (or a comma-separated list)")
        if importlib.util.find_spec(TARGETS[t]) is None:
            raise ConfigError(f"report_to: {t!r} needs the {TARGETS[t]} package, which is not "
                              f"installed (pip install 'fastgfn[{t}]'), or set report_to=none")
    cfg.run.report_to = list(dict.fromkeys(targets))
    return cfg.run.report_to


def _wandb_run(cfg, out: Path):
    import wandb

    return wandb.init(project=os.environ.get("WANDB_PROJECT", "fastgfn"),
                      dir=os.environ.get("WANDB_DIR", str(out)), name=out.name,
                      config=cfg.to_dict(), reinit="finish_previous")


class MetricsLogger:
    def __init__(self, cfg, out: Path, active: bool):
        self.active = active
        self.fh = self.tb = self.wandb = None
        if not active:
            return
        targets = resolve_report_to(cfg)
        out.mkdir(parents=True, exist_ok=True)
        self.fh = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in targets:
            self.wandb = _wandb_run(cfg, out)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.fh.flush()
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_prefixed(self, step: int, prefix: str, metrics: dict) -> None:
        """The numeric entries of ``metrics`` under ``prefix/``."""
        self.log(step, {f"{prefix}/{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
