"""``TorchEngine``: training in one plain process with torch AdamW (fused: one kernel over
all parameters), linear warm-up and cosine decay, gradient clipping and accumulation.
Checkpoints are a safetensors file of the weights and the optimizer state saved with tensors
only (loaded with ``weights_only=True``).

A step whose gradient norm is not finite is skipped on the device, with no host sync: the
norm's flag is handed to the fused AdamW as ``found_inf`` (the mechanism ``GradScaler`` uses),
which then leaves parameters and moments as they were; the gradients are zeroed as usual."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fastgfn.trainer.engines.base import adamw_with_schedule, read_engine_meta, write_engine_meta
from fastgfn.trainer.errors import CheckpointError, IncompatibleCheckpointError
from fastgfn.trainer.model.loading import resolve_device


class TorchEngine:
    kind = "torch"
    zero_stage = 0

    def __init__(self, model, cfg):
        self.module = model.to(resolve_device(cfg.run.device))
        self.cfg = cfg
        self.device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = adamw_with_schedule(params, cfg, fused=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.optimisation.grad_accum).backward()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step (skipped on the device when the norm is not finite), schedule, zero.
        Returns ``(grad norm, skipped)`` as 0-d tensors on the device (read them later)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.cfg.optimisation.grad_clip
        clip = clip if clip > 0 else float("inf")
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, clip).detach()
        else:
            norm = torch.zeros((), device=self.device)
        skipped = ~torch.isfinite(norm)
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = skipped.to(device=self.device, dtype=torch.float32)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def param_context(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_parameters(self):
        yield self.module

    # checkpoints -------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().clone() for k, v in self.module.state_dict().items()}
        _drop_shared(state)
        save_file(state, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt")
        write_engine_meta(directory, self.kind, None, 1)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        meta = read_engine_meta(directory)
        if meta["kind"] != self.kind:
            raise IncompatibleCheckpointError(
                f"resume: checkpoint {str(directory)!r} was written by the DeepSpeed engine "
                f"(ZeRO-{meta['zero_stage']}, {meta['world_size']} process(es)); this run is one "
                "plain process. Resume it under DeepSpeed with the same ZeRO stage (any number "
                "of processes: `deepspeed --num_gpus K fastgfn/train.py --deepspeed_config "
                f"ds_zero{meta['zero_stage']}.json ... --resume`), or start a new run from its "
                "exported model directory"
            )
        state = _read(directory / "model.safetensors", lambda p: load_file(str(p)))
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _is_tied(self.module, k)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        opt = _read(directory / "optimizer.pt", lambda p: torch.load(p, weights_only=True))
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


def _read(path: Path, load):
    """``load(path)``, or a CheckpointError naming the file."""
    try:
        return load(path)
    except Exception as exc:  # noqa: BLE001 (safetensors and torch raise their own types)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {first})") from None


def _drop_shared(state: dict) -> None:
    """Drop tied duplicates (safetensors refuses shared storage)."""
    seen = set()
    for k in list(state):
        key = (state[k].data_ptr(), state[k].shape)
        if key in seen:
            del state[k]
        else:
            seen.add(key)


def _is_tied(model, key: str) -> bool:
    return "lm_head" in key and getattr(model.config, "tie_word_embeddings", False)
