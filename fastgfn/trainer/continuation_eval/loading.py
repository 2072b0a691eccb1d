"""The model under evaluation: any causal LM ``fastgfn.trainer.models.load_model`` loads (a
Hugging Face directory, a .gguf file, ``smollm2``, ``tiny``, a hub name where a hub is
reachable), a fastgfn run directory (its saved ``model/``), or a one-process fastgfn
checkpoint (``checkpoints/step_XXXXXXXX`` or the ``checkpoints`` folder, whose ``latest`` is
taken): the run's own config rebuilds the model, its weights come from the checkpoint, and
LoRA adapters are merged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fastgfn.trainer.checkpoint import latest_checkpoint
from fastgfn.trainer.config import Config
from fastgfn.trainer.engines.base import read_engine_meta
from fastgfn.trainer.models import load_model


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
    model, _ = load_model(dataclasses.replace(cfg, model=spec, gguf_file=None, lora=False),
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
    known = {f.name for f in dataclasses.fields(Config)}
    run_cfg = Config(**{k: v for k, v in saved.items() if k in known})
    run_cfg = dataclasses.replace(run_cfg, device="cpu", deepspeed_config=None)
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
    if run_cfg.lora:
        model = model.merge_and_unload()
    return model.eval().requires_grad_(False)
