"""What the baseline commands (``sft``, ``rl``) share: a run config and its model, loaded the
way a fastgfn run loads them."""

from __future__ import annotations


def load_config_and_model(args):
    """``(cfg, model, tokenizer)`` for a baseline command's ``--config`` and overrides: torch's
    threads set from ``num_threads``, the full model trained (``lora`` off)."""
    from fastgfn.trainer.evaluation.loading import load_base, load_run_config

    cfg = load_run_config(args.config, args.overrides).replace(lora=False)
    model, tok = load_base(cfg, frozen=False)
    return cfg, model, tok


def trl_tokenizer(cfg, tokenizer):
    """The tokenizer TRL gets: ``tokenizer``, or for the tiny test model a Hugging Face
    tokenizer with the same ids."""
    if cfg.model.name != "tiny":
        return tokenizer
    from fastgfn.trainer.integrations.tiny import char_tokenizer_fast

    return char_tokenizer_fast()
