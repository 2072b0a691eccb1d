"""Reward-maximising RL, the paper's third kind of baseline: TRL 1.16's ``GRPOTrainer`` with
fastgfn's sampler (and the task's tool) as its rollout function, on the task's own reward.

    python -m fastgfn.trainer.baselines.rl --config configs/arithmetic.yaml --out runs/arith_rl \\
        [--steps 40] [--generations 8] [--prompts_per_step 1] [--lr 1e-5] [key=value ...]

**Why a rollout function.** TRL's own tool support (``GRPOTrainer(tools=...)``) is chat tool
calling: the model writes a JSON tool call in its chat template's format, TRL parses it, runs
a Python function and appends the answer as a tool message. The arithmetic task's tool is
not that: the calculator runs inside a plain-text rationale after each "=" of a binary
operation, with no chat template. TRL's ``rollout_func`` (experimental in 1.16) hands the
generation to the caller instead: here ``ToolRollouts`` decodes with fastgfn's sampler
(``ArithmeticTask.decode``: the shared-prompt KV cache, the calculator, the vocabulary
constraint) and returns the completions with an ``env_mask`` that is 0 at the calculator's
tokens, which TRL multiplies into its loss mask, so they are context but never trained on,
as in the GFlowNet loss and the SFT baseline.

**The reward** is the GFlowNet's, untempered: ``log R(z) = log p_LM(z STOP | F X) + log
p_LM(Y | F X z STOP)`` of the whole rationale under the frozen initial model
(``Task.state_log_rewards`` at the final state; a rationale cut at ``max_new_tokens`` is
scored as if it stopped there, as the GFlowNet loss scores it). GRPO maximises its expected
value; there is no entropy or KL term (``beta=0``, TRL's default), so nothing keeps the
policy's diversity: the contrast the paper draws with distribution matching.

**What TRL computes.** GRPO with ``num_generations`` rationales per question, the
advantages normalised within each group, ``loss_type`` and the clipping as TRL's defaults,
one optimisation step per generation batch (so old and current log-probs coincide). TRL's
log-probs are the model's own, without the task's vocabulary bias the sampler applies
(``illegal_token_bias``, -99: illegal tokens are never sampled; their probability mass only
moves the normaliser of the trained log-probs).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer


class ToolRollouts:
    """TRL ``rollout_func``: for the prompts TRL hands over (each question repeated
    ``num_generations`` times, consecutive), rationales from fastgfn's sampler with the
    task's tool at ``temperature``; one row per prompt entry."""

    def __init__(self, task, *, max_new_tokens: int, min_new_tokens: int = 0,
                 temperature: float = 1.0, seed: int = 0):
        self.task = task
        self.index = {task.prompts[i]: i for i in range(task.num_prompts())}
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def groups(self, prompts: list[str]) -> list[tuple[int, int]]:
        """``(question index, repeats)`` of each run of equal consecutive prompts."""
        out: list[tuple[int, int]] = []
        for p in prompts:
            if p not in self.index:
                raise ValueError(f"rollout: prompt {p[:60]!r} is not one of the task's")
            i = self.index[p]
            if out and out[-1][0] == i:
                out[-1] = (i, out[-1][1] + 1)
            else:
                out.append((i, 1))
        return out

    def __call__(self, prompts: list[str], trainer) -> dict:
        from fastgfn.trainer.model.loading import eval_mode

        model = trainer.accelerator.unwrap_model(trainer.model)
        term = self.task.termination_token_id
        out: dict[str, list] = {k: [] for k in ("prompt_ids", "completion_ids", "env_mask",
                                                "question_index", "rationale")}
        with eval_mode(model):
            for i, n in self.groups(prompts):
                prompt = self.task.prompt_tokens(i)
                r, _, _ = self.task.decode(
                    model, prompt, torch.full((n,), float(self.temperature)),
                    max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                    generator=self.generator)
                masks = r.masks() or [[True] * len(row) for row in r.rows()]
                for row, mask, stopped in zip(r.rows(), masks, r.terminated.tolist()):
                    end = [term] if stopped else []
                    out["prompt_ids"].append(prompt.tolist())
                    out["completion_ids"].append(row + end if row + end else [term])
                    out["env_mask"].append([int(m) for m in mask] + [1] * len(end)
                                           if row + end else [1])
                    out["question_index"].append(i)
                    out["rationale"].append(row)
        self.calls += 1
        out["logprobs"] = None  # no importance-sampling correction: the sampler is the model
        return out


def log_reward_function(task):
    """TRL reward function: the task's untempered log-reward of each whole rationale (the
    sampler's tokens, tool tokens included, from the rollout's extra fields)."""

    def log_reward(prompts, completions, question_index, rationale, **kwargs) -> list[float]:
        out = [0.0] * len(rationale)
        by_question: dict[int, list[int]] = {}
        for k, i in enumerate(question_index):
            by_question.setdefault(int(i), []).append(k)
        for i, ks in by_question.items():
            rows = [list(rationale[k]) for k in ks]
            T = max((len(r) for r in rows), default=0)
            ends = torch.tensor([[len(r)] for r in rows])
            log_r = task.state_log_rewards(i, rows, T, ends)[:, 0]
            for k, v in zip(ks, log_r.tolist()):
                out[k] = v
        return out

    log_reward.__name__ = "log_reward"
    return log_reward


def grpo_config(output_dir: str | Path, **overrides) -> GRPOConfig:
    """A ``GRPOConfig`` with offline CPU defaults (no reporting, no checkpoints, fp32, a log
    line per step, ``beta=0``); ``overrides`` are any ``GRPOConfig`` fields."""
    values = dict(output_dir=str(output_dir), report_to="none", save_strategy="no",
                  bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                  disable_tqdm=True, logging_steps=1, dataloader_num_workers=0, beta=0.0,
                  gradient_checkpointing=False, num_generations=8,
                  per_device_train_batch_size=8)
    values.update(overrides)
    return GRPOConfig(**values)


def grpo_trainer(model, tokenizer, task, args: GRPOConfig, *, max_new_tokens: int,
                 min_new_tokens: int = 0, temperature: float = 1.0) -> GRPOTrainer:
    """TRL's ``GRPOTrainer`` on every question of ``task`` with ``ToolRollouts`` and
    ``log_reward_function``. ``tokenizer``: a Hugging Face tokenizer with a pad token."""
    import os

    from fastgfn.trainer.model.loading import exportable

    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("tokenizer: needs a pad token (set tokenizer.pad_token)")
    if hasattr(model, "config"):
        model = exportable(model)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental
    data = Dataset.from_list([{"prompt": task.prompts[i], "question": i}
                              for i in range(task.num_prompts())])
    rollouts = ToolRollouts(task, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            temperature=temperature, seed=args.seed)
    return GRPOTrainer(model=model, reward_funcs=[log_reward_function(task)], args=args,
                       train_dataset=data, processing_class=tokenizer, rollout_func=rollouts)


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m fastgfn.trainer.baselines.rl",
        description="Reward-maximising RL (TRL GRPOTrainer, fastgfn's sampler and tool as "
                    "the rollout) of a run config's model on its task's log-reward; the "
                    "model goes to OUT/model.")
    p.add_argument("--config", required=True, help="a fastgfn run config (model, task, data)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--generations", type=int, default=8, help="rationales per question")
    p.add_argument("--prompts_per_step", type=int, default=1, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import json
    import time

    from fastgfn.trainer.baselines.loading import load_config_and_model, trl_tokenizer
    from fastgfn.trainer.model.loading import load_model
    from fastgfn.trainer.model.reward import RewardLM
    from fastgfn.trainer.tasks import build_task

    args = parse_args(argv)
    start = time.time()
    cfg, model, tok = load_config_and_model(args)
    reward_model, _ = load_model(cfg)  # the frozen initial model scores the rationales
    task = build_task(cfg, tok, RewardLM(reward_model.eval().requires_grad_(False)))
    tok = trl_tokenizer(cfg, tok)
    G = args.generations
    trainer = grpo_trainer(
        model, tok, task, grpo_config(
            args.out, max_steps=args.steps, learning_rate=args.lr, num_generations=G,
            per_device_train_batch_size=G * args.prompts_per_step, seed=args.seed),
        max_new_tokens=cfg.sampling.max_new_tokens, min_new_tokens=cfg.sampling.min_new_tokens,
        temperature=args.temperature)
    trainer.train()
    history = trainer.state.log_history
    rewards = [h["reward"] for h in history if "reward" in h]
    if rewards and not all(math.isfinite(v) for v in rewards):
        raise RuntimeError(f"RL: non-finite rewards {rewards}")
    trainer.save_model(str(Path(args.out) / "model"))
    summary = {"config": str(args.config), "overrides": args.overrides, "model": cfg.model.name,
               "task": cfg.task.name, "trainer": "trl.GRPOTrainer with rollout_func",
               "steps": trainer.state.global_step, "generations": G,
               "prompts_per_step": args.prompts_per_step, "lr": args.lr,
               "temperature": args.temperature, "loss_type": trainer.args.loss_type,
               "first_reward": rewards[0] if rewards else None,
               "last_reward": rewards[-1] if rewards else None, "rewards": rewards,
               "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - start, 1)}
    (Path(args.out) / "rl.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rewards"}))


if __name__ == "__main__":
    main()
