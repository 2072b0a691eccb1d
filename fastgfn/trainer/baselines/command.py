"""What the baseline commands (``sft``, ``rl``) share: a run config and its model, loaded the
way a fastgfn run loads them."""

from __future__ import annotations

import dataclasses

import torch


def load_config_and_model(args):
    """``(cfg, model, tokenizer)`` for a baseline command's ``--config`` and overrides: torch's
    threads set from ``num_threads``, the full model trained (``lora`` off)."""
    from fastgfn.trainer import load_config
    from fastgfn.trainer.models import load_model

    cfg = dataclasses.replace(load_config(args.config, args.overrides), lora=False)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    model, tok = load_model(cfg)
    return cfg, model, tok


def trl_tokenizer(cfg, tokenizer):
    """The tokenizer TRL gets: ``tokenizer``, or for the tiny test model a Hugging Face
    tokenizer with the same ids."""
    if cfg.model != "tiny":
        return tokenizer
    from fastgfn.trainer.integrations.tiny import char_tokenizer_fast

    return char_tokenizer_fast()
