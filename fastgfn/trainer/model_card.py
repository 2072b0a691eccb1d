"""The model card of an exported model: ``README.md`` in the Hugging Face format (YAML front
matter, then Markdown), written beside the weights by ``export.py``. It records what the
model is and how it was trained: the base model, the task, the objective, the steps, the
before/after evaluation table, the full config and the fastgfn version."""

from __future__ import annotations

from pathlib import Path

import torch

import fastgfn
from fastgfn.trainer.report import format_table

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF quantises
TASKS = {
    "random_number": "sample an integer uniformly from [{task_low}, {task_high}] after the "
                     "prompt (Hu et al. 2024, section 2)",
    "continuation": "continue a prompt with a sentence, sampled in proportion to the frozen "
                    "reward LM's likelihood raised to 1 / T (section 4.1)",
    "reasoning": "sample a latent rationale z in proportion to the posterior "
                 "p(z | X) p(Y | X z) of rationales that explain the known answer Y "
                 "(sections 4.3-4.4)",
    "infilling": "fill in the missing middle sentence z of a story given its beginning X and "
                 "ending Y, sampled in proportion to p(z | X) p(Y | X z) under the frozen "
                 "reward LM (section 4.2)",
}
OBJECTIVES = {
    "subtb": "modified sub-trajectory balance (SubTB, lambda = {subtb_lambda}): every prefix "
             "can terminate, its reward is scored",
    "db": "modified detailed balance (one-step sub-trajectories)",
    "tb": "trajectory balance with a learned log Z",
    "vargrad": "VarGrad (trajectory balance with log Z estimated from the batch)",
}


def base_model_id(cfg) -> str | None:
    """The hub id of the model the run started from, when it has one."""
    if cfg.model == "smollm2":
        return SMOLLM2_HUB_ID
    if cfg.model == "tiny" or cfg.model.endswith(".gguf") or Path(cfg.model).exists():
        return None  # a random test model or local files: no hub id to name
    return cfg.model


def _front_matter(cfg) -> str:
    import yaml

    meta = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    base = base_model_id(cfg)
    if base:
        meta["base_model"] = base
    meta["tags"] = ["fastgfn", "gflownet", f"gflownet-{cfg.loss}", f"task-{cfg.task}"]
    if cfg.lora:
        meta["tags"].append("lora")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _training(cfg, steps: int, log_z: float | None) -> list[str]:
    temp = f"{cfg.reward_temperature:g}"
    if cfg.reward_temperature_end is not None and cfg.reward_temperature_steps > 0:
        temp += f" -> {cfg.reward_temperature_end:g} over {cfg.reward_temperature_steps} steps"
    lines = [
        f"- steps: {steps} (batch {cfg.batch_size} x {cfg.grad_accum} micro-batches, at most "
        f"{cfg.max_new_tokens} new tokens, termination token {cfg.termination!r})",
        f"- optimiser: AdamW, lr {cfg.lr:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warm-up "
        f"steps), gradient clipping {cfg.grad_clip:g}",
        f"- parameters: {'LoRA adapters (merged)' if cfg.lora else 'all (full fine-tuning)'}, "
        f"{cfg.dtype}" + (", DeepSpeed" if cfg.deepspeed_config else ""),
        f"- reward temperature: {temp}",
        f"- exploration: {cfg.explore_prob:g} of rows tempered in [{cfg.explore_temp_low:g}, "
        f"{cfg.explore_temp_high:g}], replay probability {cfg.replay_prob:g}",
    ]
    if log_z is not None and cfg.loss != "vargrad":
        lines.append(f"- final log Z: {log_z:.4f}")
    return lines


def model_card(cfg, *, steps: int, before: dict | None, after: dict | None,
               prompt: str | None = None, log_z: float | None = None) -> str:
    """The README.md text of a model exported by a run of ``cfg`` after ``steps`` steps."""
    import yaml

    base = base_model_id(cfg) or cfg.model
    task = TASKS.get(cfg.task, cfg.task).format(**cfg.to_dict())
    parts = [
        _front_matter(cfg),
        f"# {base} fine-tuned as a GFlowNet ({cfg.task})\n",
        f"`{base}` fine-tuned with fastgfn {fastgfn.__version__} to sample sequences in "
        "proportion to a reward (GFlowNet fine-tuning: Hu et al., \"Amortizing intractable "
        "inference in large language models\", ICLR 2024).\n",
        "## Task\n", f"{task[0].upper()}{task[1:]}."
        + (f" Prompt: `{prompt!r}`." if prompt else "") + "\n",
        "## Objective\n", OBJECTIVES[cfg.loss].format(**cfg.to_dict()) + ".\n",
        "## Training\n", "\n".join(_training(cfg, steps, log_z)) + "\n",
        "## Evaluation\n",
        (format_table(before, after) + "\n" if after else
         "Not evaluated (`eval_samples=0`).\n"),
        "## Configuration\n",
        "```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=True) + "```\n",
        "## Framework versions\n",
        f"- fastgfn {fastgfn.__version__}\n- torch {torch.__version__}\n"
        f"- transformers {_version('transformers')}\n",
    ]
    return "\n".join(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
