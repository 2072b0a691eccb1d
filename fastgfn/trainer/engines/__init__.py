"""Optimisation engines behind one protocol (``base.Engine``): ``TorchEngine`` for one plain
process, ``DeepSpeedEngine`` for ZeRO-2/3. This subpackage is the only part of fastgfn that
imports deepspeed."""

from __future__ import annotations

import os

from fastgfn.trainer.engines.base import Engine, lr_factor


def uses_deepspeed(cfg) -> bool:
    """A DeepSpeed config was given, or the process was started by a distributed launcher."""
    return cfg.run.deepspeed_config is not None or (
        "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


def build_engine(model, cfg, ds_config: dict | None) -> Engine:
    """The engine for ``model``: DeepSpeed when ``ds_config`` is given, else plain torch."""
    if ds_config is not None:
        from fastgfn.trainer.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, ds_config)
    from fastgfn.trainer.engines.torch_engine import TorchEngine

    return TorchEngine(model, cfg)


__all__ = ["Engine", "build_engine", "lr_factor", "uses_deepspeed"]
