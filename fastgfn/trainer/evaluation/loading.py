"""What every evaluation command loads: the run config (``--config`` and overrides) of the
task it evaluates, the base LM on the evaluation's device, frozen, and the models under
evaluation: any causal LM ``fastgfn.trainer.model.loading.load_model`` loads (a Hugging Face
directory, a .gguf file, ``smollm2``, ``tiny``, a hub name where a hub is reachable), a
fastgfn run directory (its saved ``model/``), or a one-process fastgfn checkpoint
(``checkpoints/step_XXXXXXXX`` or the ``checkpoints`` folder, whose ``latest`` is taken): the
run's own config rebuilds the model, its weights come from the checkpoint, and LoRA adapters
are merged. The baseline commands (``fastgfn.trainer.baselines``) load their config and
model here too."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgfn.trainer.config import Config
from fastgfn.trainer.engines.base import read_engine_meta
from fastgfn.trainer.model.loading import load_model, resolve_device
from fastgfn.trainer.persistence.checkpoint import latest_checkpoint


def load_run_config(path, overrides, task: str | None = None) -> Config:
    """The config of ``--config`` with its overrides; ``ValueError`` naming ``--config`` when
    it is not a config of ``task``. Torch's CPU threads are set from ``num_threads``."""
    from fastgfn.trainer import load_config

    cfg = load_config(path, overrides)
    if task is not None and cfg.task.name != task:
        raise ValueError(f"--config: must be a {task} config, got task={cfg.task.name!r}")
    if cfg.run.num_threads > 0:
        torch.set_num_threads(cfg.run.num_threads)
    return cfg


def evaluation_device(cfg: Config) -> torch.device:
    """``device`` of the config, ``auto`` being CUDA when there is one."""
    return resolve_device(cfg.run.device)


def load_base(cfg: Config, device=None, frozen: bool = True):
    """``(model, tokenizer)``: the config's model without LoRA (the base LM every method is
    compared with, or the model a baseline trains), on ``device`` when given; ``frozen``: in
    eval mode without gradients."""
    model, tokenizer = load_model(cfg.replace(lora=False))
    if device is not None:
        model = model.to(device)
    if frozen:
        model = model.eval().requires_grad_(False)
    return model, tokenizer


def check_vocabulary(model, tokenizer, flag: str, spec) -> None:
    """A model under evaluation shares the base LM's tokenizer (``ValueError`` naming
    ``flag``)."""
    if int(model.config.vocab_size) < len(tokenizer):
        raise ValueError(f"{flag}: {str(spec)!r} has a smaller vocabulary than the base LM's "
                         "tokenizer; it must share the base LM's tokenizer")


def checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint ``path`` names (itself, or the latest of a checkpoints folder or of a
    run directory without a saved model), or None when it is no checkpoint."""
    if (path / "client_state.json").is_file():
        return path
    if (path / "latest").is_file():
        return latest_checkpoint(path)
    if (path / "checkpoints" / "latest").is_file() and not (path / "model").is_dir():
        return latest_checkpoint(path / "checkpoints")
    return None


def load_policy(spec: str, cfg: Config):
    """The policy named by ``spec`` (see the module docstring), frozen in eval mode."""
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "model" / "config.json").is_file():
            return load_policy(str(path / "model"), cfg)
        ckpt = checkpoint_dir(path)
        if ckpt is not None:
            return _from_checkpoint(ckpt)
    model, _ = load_model(cfg.replace(model=spec, gguf_file=None, lora=False),
                          tokenizer=False)
    return model.eval().requires_grad_(False)


def _from_checkpoint(ckpt: Path):
    from safetensors.torch import load_file

    meta = read_engine_meta(ckpt)
    if meta["kind"] != "torch":
        raise ValueError(
            f"model: {str(ckpt)!r} is a DeepSpeed checkpoint (ZeRO-{meta['zero_stage']}); "
            "evaluate the run's exported model directory instead (output_dir/model)"
        )
    saved = json.loads((ckpt / "client_state.json").read_text())["config"]
    run_cfg = Config.from_saved(saved).replace(device="cpu", deepspeed_config=None)
    model, _ = load_model(run_cfg, tokenizer=False)
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not ("lm_head" in k and tied)]
    if missing or unexpected:
        raise ValueError(
            f"model: checkpoint {str(ckpt)!r} does not fit its run's model: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    if run_cfg.model.lora:
        model = model.merge_and_unload()
    return model.eval().requires_grad_(False)
