"""Supervised fine-tuning (SFT), the maximum-likelihood baseline of the paper: a thin wrapper
of TRL's ``SFTTrainer`` (``trl==1.16.0``) for examples of (prompt, completion) with an optional
per-token loss mask.

    from fastgfn.trainer.baselines.sft import SFTExample, train_sft

    examples = [SFTExample("Beginning: ... Middle:", " He bought a dog."),
                SFTExample(prompt_ids, completion_ids, loss_mask=[1, 1, 0, 0, 1])]
    trainer = train_sft(model, tokenizer, examples, "runs/sft", num_train_epochs=3)

**What is trained.** Each example becomes one sequence ``prompt + completion``, tokenized the
way fastgfn's tasks and sampler see it: the prompt and the completion each encoded on their
own (``add_special_tokens=False``) and concatenated, so the completion's tokens are exactly
the actions the policy would take after the prompt. Nothing is appended: a completion that
should teach the model to stop must end with the termination token the policy stops on (in
the text, or in the ids). The loss is the mean over the batch's loss tokens of
``-log p(token | everything before it)``; the loss tokens are the completion's tokens whose
``loss_mask`` entry is 1 (all of them without a mask). Prompt tokens and masked tokens stay
in the input, as context for the tokens after them, but are never predicted: their labels
are ``-100`` (the arithmetic task masks the calculator's results this way, which the policy
never chooses).

**How.** The examples go to TRL as a pre-tokenized ``datasets.Dataset`` with ``input_ids`` and
``labels`` columns; TRL then uses the labels as they are (it builds none, adds no EOS, and
truncates to ``max_length`` only). Its default loss (``loss_type="nll"``) is the masked
cross-entropy above, computed through its fused lm_head. Everything else (optimizer,
schedule, gradient accumulation, accelerate/DeepSpeed, logging, checkpoints) is TRL's and
``transformers.Trainer``'s, set through ``SFTConfig`` (``sft_config`` below gives offline CPU
defaults).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

IGNORE = -100  # the label of a token that is not predicted (prompt, masked)


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: the ``completion`` is learned after the ``prompt``.

    ``prompt`` and ``completion`` are text or token ids. ``loss_mask`` (optional) has one entry
    per completion token: 1 (or True) puts the token in the loss, 0 leaves it out (it stays in
    the input). Masks need the completion's tokens, so give ids with a mask, or text whose
    tokenization you know."""

    prompt: str | Sequence[int]
    completion: str | Sequence[int]
    loss_mask: Sequence[int] | None = None


def _ids(tokenizer, value, what: str) -> list[int]:
    if isinstance(value, str):
        return list(tokenizer.encode(value, add_special_tokens=False))
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        ids = [int(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: must be text or a sequence of token ids, got "
                        f"{type(value).__name__}") from None
    if any(v != orig for v, orig in zip(ids, value)):
        raise TypeError(f"{what}: token ids must be integers")
    return ids


def encode_example(tokenizer, example: SFTExample, index: int = 0) -> dict:
    """``{"input_ids": prompt + completion, "labels": ...}`` for one example; ``ValueError`` /
    ``TypeError`` naming the example and field for anything unusable."""
    if not isinstance(example, SFTExample):
        raise TypeError(f"examples[{index}]: must be an SFTExample, got {type(example).__name__}")
    prompt = _ids(tokenizer, example.prompt, f"examples[{index}].prompt")
    completion = _ids(tokenizer, example.completion, f"examples[{index}].completion")
    if not completion:
        raise ValueError(f"examples[{index}].completion: has no tokens")
    vocab = len(tokenizer)
    bad = [t for t in prompt + completion if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"examples[{index}]: token id {bad[0]} is not in the tokenizer's "
                         f"vocabulary [0, {vocab})")
    mask = [1] * len(completion) if example.loss_mask is None else list(example.loss_mask)
    if len(mask) != len(completion):
        raise ValueError(f"examples[{index}].loss_mask: needs one entry per completion token "
                         f"({len(completion)}), got {len(mask)}")
    if any(m not in (0, 1) for m in mask):
        raise ValueError(f"examples[{index}].loss_mask: entries must be 0 or 1")
    if not any(mask):
        raise ValueError(f"examples[{index}].loss_mask: masks every completion token; the "
                         "example would teach nothing")
    labels = [IGNORE] * len(prompt) + [t if m else IGNORE for t, m in zip(completion, mask)]
    return {"input_ids": prompt + completion, "labels": labels}


def examples_dataset(tokenizer, examples: Sequence[SFTExample]) -> Dataset:
    """The examples as the pre-tokenized ``datasets.Dataset`` TRL trains on."""
    if not examples:
        raise ValueError("examples: need at least one example")
    rows = [encode_example(tokenizer, ex, i) for i, ex in enumerate(examples)]
    return Dataset.from_list(rows)


def sft_config(output_dir: str | Path, **overrides) -> SFTConfig:
    """An ``SFTConfig`` with offline defaults: no reporting, no checkpoints, fp32, the CPU
    unless CUDA is available, no activation checkpointing (TRL turns it on), no progress bar,
    a log line every step. ``overrides`` are any
    ``SFTConfig`` fields (``learning_rate``, ``num_train_epochs``, ``max_steps``,
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``seed``, ...)."""
    values = dict(output_dir=str(output_dir), report_to="none", save_strategy="no",
                  bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                  disable_tqdm=True, logging_steps=1, activation_checkpointing=False,
                  dataloader_num_workers=0)
    values.update(overrides)
    return SFTConfig(**values)


def sft_trainer(model, tokenizer, examples: Sequence[SFTExample], args: SFTConfig | None = None,
                *, eval_examples: Sequence[SFTExample] | None = None,
                output_dir: str | Path = "runs/sft", **kwargs) -> SFTTrainer:
    """TRL's ``SFTTrainer`` on ``examples`` (``SFTExample``s), ready to ``train()``.
    ``tokenizer`` must be a Hugging Face tokenizer (TRL saves it with the model); ``args``
    default to ``sft_config(output_dir)``; ``kwargs`` go to ``SFTTrainer``. A model loaded
    from a GGUF file (dequantised, but still marked quantized, which ``transformers.Trainer``
    refuses to train) is first copied into a plain model: train and save ``trainer.model``."""
    from fastgfn.trainer.model.loading import exportable

    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("tokenizer: needs a pad token (set tokenizer.pad_token)")
    if hasattr(model, "config"):
        model = exportable(model)
    args = args if args is not None else sft_config(output_dir)
    train = examples_dataset(tokenizer, examples)
    evals = examples_dataset(tokenizer, eval_examples) if eval_examples else None
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                      processing_class=tokenizer, **kwargs)


def train_sft(model, tokenizer, examples: Sequence[SFTExample], output_dir: str | Path,
              *, save: bool = True, **overrides) -> SFTTrainer:
    """Train with ``sft_config(output_dir, **overrides)`` and, with ``save``, write the model
    and tokenizer to ``output_dir/model`` (a Hugging Face directory any fastgfn command
    loads). Returns the trainer (``trainer.state.log_history`` holds the losses)."""
    trainer = sft_trainer(model, tokenizer, examples, sft_config(output_dir, **overrides))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses and not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"SFT: non-finite training loss {losses}")
    if save:
        trainer.save_model(str(Path(output_dir) / "model"))
    return trainer


# the command ------------------------------------------------------------------------------
def tasks_with_sft_data() -> list[str]:
    """The registered tasks that have SFT examples (``Task.sft_pairs``)."""
    from fastgfn.trainer.tasks import TASKS, Task, task_class

    return [n for n in TASKS if task_class(n).sft_pairs.__func__ is not Task.sft_pairs.__func__]


def task_examples(cfg, tokenizer) -> list[SFTExample]:
    """The SFT examples of ``cfg``'s task (``Task.sft_pairs``); ``ValueError`` for a task
    without."""
    from fastgfn.trainer.tasks import task_class

    triples = task_class(cfg.task.name).sft_pairs(cfg, tokenizer)
    if triples is None:
        raise ValueError(f"task: no SFT data for task {cfg.task.name!r}; tasks with SFT data: "
                         f"{', '.join(tasks_with_sft_data())}")
    return [SFTExample(p, c, m) for p, c, m in triples]


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fastgfn.trainer.baselines.sft",
        description="Supervised fine-tuning of a run config's model on its task's SFT data "
                    "(TRL SFTTrainer); the model goes to OUT/model.")
    p.add_argument("--config", required=True, help="a fastgfn run config (model, task, data)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import json
    import time

    from fastgfn.trainer.baselines.loading import load_config_and_model, trl_tokenizer

    args = parse_args(argv)
    start = time.time()
    cfg, model, tok = load_config_and_model(args)
    tok = trl_tokenizer(cfg, tok)
    examples = task_examples(cfg, tok)
    trainer = train_sft(model, tok, examples, args.out, num_train_epochs=args.epochs,
                        learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                        gradient_accumulation_steps=args.grad_accum, seed=args.seed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"config": str(args.config), "overrides": args.overrides, "model": cfg.model.name,
               "task": cfg.task.name, "examples": len(examples), "epochs": args.epochs,
               "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
               "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None,
               "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - start, 1)}
    (Path(args.out) / "sft.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
