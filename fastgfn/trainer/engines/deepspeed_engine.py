"""``DeepSpeedEngine``: ZeRO-2 / ZeRO-3 training through ``deepspeed.initialize`` (gloo on
CPUs, nccl on GPUs), and the frozen ZeRO-3 module that serves a partitioned reward LM.

DeepSpeed counts micro-batches in ``engine.step()``: it must be called after every
micro-batch's backward and only steps the optimizer at the accumulation boundary, so
``backward`` calls it for all but the last micro-batch of a training step and ``step`` for
the last.

A checkpoint saved by K processes resumes in K' != K processes through DeepSpeed's universal
checkpoint (converted once, on rank 0, into ``<checkpoint>/universal``); a checkpoint of the
torch engine or of another ZeRO stage is refused with a ``ValueError`` that says what to do.
DeepSpeed's files are read with ``weights_only=True`` (``safe_load.py``): loading or converting
a checkpoint runs no code from it.

Non-finite gradients: ZeRO-1/2/3 skip the optimizer step themselves when the gradient norm is
not finite (DeepSpeed's overflow check, which also runs for fp32 and reads the norm on the
host); the schedule is stepped here for such a step, so it follows the trainer's step count
as with the torch engine. Without ZeRO (stage 0) the fused AdamW gets the norm's flag as
``found_inf``, as in the torch engine.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch

from fastgfn.trainer.engines.base import (
    adamw_with_schedule,
    lr_factor,
    read_engine_meta,
    write_engine_meta,
)
from fastgfn.trainer.engines.distributed import comm_device, rank, world_size, zero_stage
from fastgfn.trainer.engines.ds_config import load_ds_config
from fastgfn.trainer.engines.safe_load import weights_only_loads
from fastgfn.trainer.errors import CheckpointError, IncompatibleCheckpointError

__all__ = ["DeepSpeedEngine", "frozen_zero3_module", "load_ds_config"]


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model, cfg, ds_config: dict):
        import deepspeed

        self.cfg = cfg
        self.ds_config = ds_config
        params = [p for p in model.parameters() if p.requires_grad]
        if "optimizer" in ds_config:
            # DeepSpeed builds the optimizer from the section (its CPU Adam under offload,
            # see ds_config.py); fastgfn's schedule is attached to whatever it built
            optimizer = None

            def scheduler(opt):
                schedule = cfg.optimisation
                return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule))
        else:
            # stage 0 steps this optimizer itself: fused, so a step can be skipped (found_inf)
            optimizer, scheduler = adamw_with_schedule(
                params, cfg, fused=zero_stage(ds_config) == 0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config,
        )
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)
        self.zero_stage = zero_stage(ds_config)
        self._micro = 0

    def backward(self, loss):
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.cfg.optimisation.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self) -> tuple[float, bool]:
        """The boundary step; returns ``(grad norm, skipped)``."""
        norm = self._skip_nonfinite_stage0() if self.zero_stage == 0 else None
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        self._micro = 0
        skipped = self.engine.skipped_steps > skipped_before
        if skipped and self.scheduler is not None:
            self.scheduler.step()  # DeepSpeed does not step the schedule for a skipped step
        if norm is not None:
            return float(norm), bool(not torch.isfinite(norm))
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), skipped

    def _skip_nonfinite_stage0(self) -> torch.Tensor:
        """Stage 0: the gradient norm (gradients already all-reduced), and the fused AdamW
        told to skip the step when it is not finite."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.zeros((), device=self.device)
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.float()) for g in grads]))
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        return norm

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def param_context(self):
        """Gather ZeRO-3 parameters once for a whole rollout (not once per token)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    @contextlib.contextmanager
    def full_parameters(self):
        with self.param_context():
            yield self.module

    # checkpoints -------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        client = {}
        if self.zero_stage < 3:
            # ds_to_universal needs this entry to convert a ZeRO-1/2 checkpoint
            client[UNIVERSAL_CHECKPOINT_INFO] = {
                UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
            }
        self.engine.save_checkpoint(
            str(directory.parent), tag=directory.name, client_state=client, save_latest=False
        )
        if rank() == 0:
            write_engine_meta(directory, self.kind, self.zero_stage, world_size())

    def load(self, directory: Path) -> None:
        """Load a checkpoint of this engine. Saved by another number of processes, it is
        converted to DeepSpeed's universal checkpoint (once, by rank 0) and loaded from that,
        which re-partitions the fp32 weights and the optimizer state for this world size."""
        directory = Path(directory)
        meta = read_engine_meta(directory)
        refuse_incompatible(directory, meta, self.zero_stage)
        if meta["world_size"] == world_size():
            with weights_only_loads():
                path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        else:
            universal = ensure_universal_checkpoint(directory)
            config = self.engine._config
            config.load_universal_checkpoint = True  # read at load time only
            try:
                with weights_only_loads():
                    path, _ = self.engine.load_checkpoint(str(directory), tag=universal.name)
            finally:
                config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"resume: DeepSpeed could not load checkpoint {str(directory)!r}")


def refuse_incompatible(directory: Path, meta: dict, zero_stage: int) -> None:
    """A checkpoint of the torch engine or of another ZeRO stage: a ValueError saying what
    to do instead."""
    if meta["kind"] != DeepSpeedEngine.kind:
        raise IncompatibleCheckpointError(
            f"resume: checkpoint {str(directory)!r} was written by one plain process (the "
            f"torch engine); this run is DeepSpeed ZeRO-{zero_stage}. Resume it without "
            "--deepspeed_config in one plain process, or start a new DeepSpeed run from its "
            "exported model directory"
        )
    if meta["zero_stage"] is not None and meta["zero_stage"] != zero_stage:
        raise IncompatibleCheckpointError(
            f"resume: checkpoint {str(directory)!r} was saved under ZeRO-{meta['zero_stage']} "
            f"but this run's deepspeed_config is ZeRO-{zero_stage}; resume with a "
            f"ZeRO-{meta['zero_stage']} config (configs/ds_zero{meta['zero_stage']}.json), "
            "or start a new run from its exported model directory"
        )


def ensure_universal_checkpoint(directory: Path) -> Path:
    """``<directory>/universal``: the DeepSpeed checkpoint in ``directory`` converted to a
    universal checkpoint (``deepspeed.checkpoint.ds_to_universal``), which any world size can
    load. Rank 0 converts (into a temporary folder renamed into place); all ranks wait."""
    directory = Path(directory)
    out = directory / "universal"
    error, reason = torch.zeros(1, device=comm_device()), ""
    if rank() == 0 and not out.is_dir():
        try:
            _convert_to_universal(directory, out)
        except Exception as exc:  # noqa: BLE001 (reported below, on every rank)
            error[0] = 1
            reason = f"{type(exc).__name__}: {exc}"
    if world_size() > 1:
        torch.distributed.all_reduce(error)
    if error.item():
        detail = reason if rank() == 0 else "see rank 0"
        raise CheckpointError(
            f"resume: checkpoint {str(directory)!r} was saved by another number of processes "
            f"and its conversion to a universal checkpoint failed ({detail}); resume with the "
            "world size that saved it, or convert it by hand: python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {directory} "
            f"--output_folder {out}"
        )
    return out


def _convert_to_universal(directory: Path, out: Path) -> None:
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    tmp = directory / f".tmp-universal-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(directory), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    try:
        with contextlib.redirect_stdout(None), weights_only_loads():
            ds_to_universal.main(args)
        (directory / "latest_universal").unlink(missing_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def frozen_zero3_module(model, ds_config: dict):
    """A frozen model for inference under ZeRO-3: a DeepSpeed engine with no optimizer
    (DeepSpeed's ZeRO-Inference), so the weights are partitioned over the ranks and each
    layer is gathered for its forward and released after it. Every rank must call the
    model's forward the same number of times. Returns the engine; its ``.module`` is the
    model to call (keep the engine referenced for as long as the model is used)."""
    import deepspeed

    if zero_stage(ds_config) != 3:
        raise ValueError("ds_config: frozen_zero3_module needs a ZeRO-3 config (stage 3)")
    conf = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        conf.pop(key, None)
    conf["gradient_clipping"] = 0.0
    engine, *_ = deepspeed.initialize(model=model.requires_grad_(False), config=conf)
    engine.eval()
    return engine
