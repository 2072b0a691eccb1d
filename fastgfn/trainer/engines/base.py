"""What the trainer needs from an optimisation engine (``Engine``), the learning-rate
schedule both engines share, and the ``engine.json`` record every checkpoint carries.

Two engines implement the protocol: ``TorchEngine`` (one plain process, torch AdamW) and
``DeepSpeedEngine`` (ZeRO-2/3 through ``deepspeed.initialize``). A training step is
``backward(loss)`` once per micro-batch, then ``step()`` once; the engine scales for gradient
accumulation, clips, and steps the optimizer and the schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Engine(Protocol):
    kind: str  # "torch" or "deepspeed", recorded in every checkpoint
    module: torch.nn.Module  # the policy being trained
    device: torch.device
    zero_stage: int  # 0 for the torch engine

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss."""

    def step(self) -> float:
        """After ``grad_accum`` micro-batches: clip, optimizer and schedule step, zero the
        gradients. Returns the gradient norm before clipping."""

    def lr(self) -> float: ...

    def param_context(self) -> contextlib.AbstractContextManager:
        """Held around a whole rollout: the parameters whole (ZeRO-3: gathered once)."""

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """Yields the module with its full parameters on every rank (export, inspection)."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


def lr_factor(step: int, opt) -> float:
    """Linear warm-up, then constant, or cosine or linear decay to ``lr_min_ratio`` at
    ``steps`` (``opt``: the run's optimisation section)."""
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.lr_schedule == "constant":
        return 1.0
    span = max(1, opt.steps - opt.warmup_steps)
    f = min(1.0, (step - opt.warmup_steps) / span)
    shape = 1 - f if opt.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * f))
    return opt.lr_min_ratio + (1 - opt.lr_min_ratio) * shape


def adamw_with_schedule(params, cfg, fused: bool = False):
    """The policy's AdamW and its ``lr_factor`` schedule."""
    opt = cfg.optimisation
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay,
                                  **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opt))
    return optimizer, scheduler


def reapply_schedule(scheduler, cfg) -> None:
    """After loading a checkpoint whose learning rate, weight decay or schedule differ from
    ``cfg``: the optimizer's groups take ``cfg``'s values at the scheduler's current step
    (a loaded checkpoint otherwise brings its own back)."""
    opt = cfg.optimisation
    scheduler.base_lrs = [opt.lr] * len(scheduler.optimizer.param_groups)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = opt.lr
        group["lr"] = opt.lr * lr_factor(scheduler.last_epoch, opt)
        group["weight_decay"] = opt.weight_decay


ENGINE_META = "engine.json"


def write_engine_meta(directory: Path, kind: str, zero_stage: int | None, world: int) -> None:
    meta = {"kind": kind, "zero_stage": zero_stage, "world_size": world}
    (Path(directory) / ENGINE_META).write_text(json.dumps(meta))


def read_engine_meta(directory: Path) -> dict:
    """``{"kind", "zero_stage", "world_size"}`` of a checkpoint directory (inferred from the
    files for checkpoints written before ``engine.json`` existed)."""
    directory = Path(directory)
    path = directory / ENGINE_META
    if path.is_file():
        return json.loads(path.read_text())
    if (directory / "model.safetensors").is_file():
        return {"kind": "torch", "zero_stage": None, "world_size": 1}
    optim = sorted(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    if not optim:
        raise ValueError(f"resume: {str(directory)!r} holds no fastgfn engine checkpoint")
    # ZeRO-3 writes per-rank model states; ZeRO-1 and 2 one mp_rank file (stage unknown)
    stage = 3 if any(directory.glob("zero_pp_rank_*_model_states.pt")) else None
    return {"kind": "deepspeed", "zero_stage": stage, "world_size": len(optim)}
