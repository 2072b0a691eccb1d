"""TRL's GRPO training step on bench_step's workload: the RL baseline's step time.

``bench_step.py --methods ...,grpo[,grpo+bf16]`` runs this worker in its own subprocess,
interleaved with the other methods' rounds. The workload is bench_step's: SmolLM2-135M
(full-parameter, fp32 weights, torch AdamW fused), one prompt, ``--batch`` rows (GRPO's
group: ``num_generations = batch``), exactly ``--tokens`` new tokens per row
(``min_new_tokens = max_completion_length``), the reward the frozen initial model's
log-likelihood of the completion followed by "." (fastgfn's ``frozen_prefix_logrewards`` at
the final state, the same number the GFlowNet step's reward pass computes).

What the step is: TRL 1.16 ``GRPOTrainer`` as it ships, Hugging Face ``generate`` for the
rollouts (KV cache, sampling at T = 1), the reward function, the policy's forward over prompt
and completions (logits materialised, TRL's ``selective_log_softmax``), the GRPO loss with
``beta = 0`` (no reference model, TRL's default) and one optimisation step per generation
batch (so no separate old-log-prob pass), backward, AdamW. ``+bf16`` sets ``bf16=True``
(Accelerate's autocast to bfloat16 on the CPU, fp32 master weights), the counterpart of
fastgfn's ``+bf16``. A step is timed from the trainer's ``on_step_begin`` to its
``on_step_end`` callback (generation included); memory as bench_step: the peak RSS during
the timed steps minus the RSS after setup (model, frozen copy, AdamW states allocated).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import torch


def grpo_worker(args, options: tuple[str, ...], prompt_text: str, peak_rss, rss_bytes,
                trim) -> dict:
    """Run ``args.warmup + args.steps`` GRPO steps; bench_step's result fields."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastgfn.trainer import load_config
    from fastgfn.trainer.baselines.loading import trl_tokenizer
    from fastgfn.trainer.model.loading import exportable, load_model
    from fastgfn.trainer.scoring import frozen_prefix_logrewards

    torch.manual_seed(0)
    cfg = load_config(None, [f"model={args.model}"])
    policy, tok = load_model(cfg)
    reward_model = copy.deepcopy(policy).eval().requires_grad_(False)
    policy = exportable(policy)
    tokenizer = trl_tokenizer(cfg, tok)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt = torch.tensor(tokenizer.encode(prompt_text, add_special_tokens=False))
    term = tokenizer.encode(".", add_special_tokens=False)[0]

    def log_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        if any(len(c) != args.tokens for c in completion_ids):
            raise RuntimeError(f"GRPO completions of {sorted({len(c) for c in completion_ids})} "
                               f"tokens, not the workload's {args.tokens}")
        tokens = torch.tensor([list(c) for c in completion_ids])
        return frozen_prefix_logrewards(reward_model, prompt, tokens, term)[:, -1].tolist()

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    for p in policy.parameters():  # allocate the AdamW states before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    steps = args.warmup + args.steps
    times: list[float] = []
    cpu_times: list[float] = []
    losses: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True,
            bf16="bf16" in options, fp16=False, disable_tqdm=True, logging_steps=1,
            dataloader_num_workers=0, beta=0.0, gradient_checkpointing=False,
            num_generations=args.batch, per_device_train_batch_size=args.batch,
            max_completion_length=args.tokens, generation_kwargs={"min_new_tokens": args.tokens},
            temperature=1.0, max_steps=steps, learning_rate=1e-6, seed=0,
        )
        data = Dataset.from_list([{"prompt": prompt_text}] * (args.batch * steps))
        trainer = GRPOTrainer(model=policy, reward_funcs=[log_reward], args=config,
                              train_dataset=data, processing_class=tokenizer,
                              optimizers=(opt, None), callbacks=[StepClock()])
        trim()
        base = rss_bytes()
        with peak_rss() as peak:
            trainer.train()
    w = args.warmup
    return {
        "step_s_all": times[w:],
        "step_cpu_s_all": cpu_times[w:],
        "phase_s": {},
        "phase_cpu_s": {},
        "losses": losses,
        "peak_step_mb": (peak.peak - base) / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "prompt_tokens": prompt.numel(),
        "sample_dtype": None,
    }
