"""The fine-tuned model as a Hugging Face directory (weights, config, tokenizer and a model
card, ``README.md``: ``model_card.py``), written at the end of every run unless
``save_model=false``: ``<output_dir>/model`` or ``export_dir``.
ZeRO-3 weights are gathered first and LoRA adapters merged, so the directory loads with a
plain ``AutoModelForCausalLM.from_pretrained``."""

from __future__ import annotations

import copy
from pathlib import Path

from fastgfn.trainer.engines.distributed import barrier, rank


def export_model(engine, tokenizer, directory: Path, lora: bool, card: str | None = None) -> None:
    """``save_pretrained`` the engine's policy into ``directory``, with the model card
    ``card`` as its README.md (every rank calls this)."""
    from fastgfn.trainer.model.loading import exportable

    with engine.full_parameters() as model:
        if rank() == 0:
            # LoRA: merged into a copy, so the run's own model keeps its adapters
            m = exportable(copy.deepcopy(model).merge_and_unload() if lora else model)
            m.save_pretrained(str(directory), safe_serialization=True)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(directory))
            if card is not None:
                (Path(directory) / "README.md").write_text(card)
    barrier()


def usage(directory: Path, prompt: str | None) -> str:
    """Three lines that load the exported model and sample from it."""
    text = (prompt or "Hello").replace('"', '\\"')
    return "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok, lm = AutoTokenizer.from_pretrained("{directory}"), '
        f'AutoModelForCausalLM.from_pretrained("{directory}")',
        f'print(tok.decode(lm.generate(**tok("{text}", return_tensors="pt"), do_sample=True, '
        'max_new_tokens=8)[0]))',
    ])
