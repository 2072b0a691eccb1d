"""The model card of an exported model: ``README.md`` in the Hugging Face format (YAML front
matter, then Markdown), written beside the weights by ``export.py``. It records what the
model is and how it was trained: the base model, the task, the objective, the steps, the
before/after evaluation table, the full config and the fastgfn version."""

from __future__ import annotations

from pathlib import Path

import torch

import fastgfn
from fastgfn.trainer.reporting.report import format_table

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF quantises
OBJECTIVES = {
    "subtb": "modified sub-trajectory balance (SubTB, lambda = {subtb_lambda}): every prefix "
             "can terminate, its reward is scored",
    "db": "modified detailed balance (one-step sub-trajectories)",
    "tb": "trajectory balance with a learned log Z",
    "vargrad": "VarGrad (trajectory balance with log Z estimated from the batch)",
}


def base_model_id(cfg) -> str | None:
    """The hub id of the model the run started from, when it has one."""
    if cfg.model.name == "smollm2":
        return SMOLLM2_HUB_ID
    name = cfg.model.name
    if name == "tiny" or name.endswith(".gguf") or Path(name).exists():
        return None  # a random test model or local files: no hub id to name
    return cfg.model.name


def _front_matter(cfg) -> str:
    import yaml

    meta = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    base = base_model_id(cfg)
    if base:
        meta["base_model"] = base
    meta["tags"] = ["fastgfn", "gflownet", f"gflownet-{cfg.objective.loss}",
                    f"task-{cfg.task.name}"]
    if cfg.model.lora:
        meta["tags"].append("lora")
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _training(cfg, steps: int, log_z: float | None) -> list[str]:
    sampling, opt, objective = cfg.sampling, cfg.optimisation, cfg.objective
    temp = f"{objective.reward_temperature:g}"
    if objective.reward_temperature_end is not None and objective.reward_temperature_steps > 0:
        temp += (f" -> {objective.reward_temperature_end:g} over "
                 f"{objective.reward_temperature_steps} steps")
    lines = [
        f"- steps: {steps} (batch {sampling.batch_size} x {opt.grad_accum} micro-batches, at "
        f"most {sampling.max_new_tokens} new tokens, termination token "
        f"{cfg.task.termination!r})",
        f"- optimiser: AdamW, lr {opt.lr:g} ({opt.lr_schedule}, {opt.warmup_steps} warm-up "
        f"steps), gradient clipping {opt.grad_clip:g}",
        f"- parameters: {'LoRA adapters (merged)' if cfg.model.lora else 'all (full fine-tuning)'}"
        f", {cfg.model.dtype}" + (", DeepSpeed" if cfg.run.deepspeed_config else ""),
        f"- reward temperature: {temp}",
        f"- exploration: {sampling.explore_prob:g} of rows tempered in "
        f"[{sampling.explore_temp_low:g}, {sampling.explore_temp_high:g}], replay probability "
        f"{sampling.replay_prob:g}",
    ]
    if log_z is not None and objective.loss != "vargrad":
        lines.append(f"- final log Z: {log_z:.4f}")
    return lines


def model_card(cfg, *, steps: int, before: dict | None, after: dict | None,
               prompt: str | None = None, log_z: float | None = None) -> str:
    """The README.md text of a model exported by a run of ``cfg`` after ``steps`` steps."""
    import yaml

    base = base_model_id(cfg) or cfg.model.name
    from fastgfn.trainer.tasks import task_class

    task = (task_class(cfg.task.name).description or cfg.task.name).format(**cfg.to_dict())
    parts = [
        _front_matter(cfg),
        f"# {base} fine-tuned as a GFlowNet ({cfg.task.name})\n",
        f"`{base}` fine-tuned with fastgfn {fastgfn.__version__} to sample sequences in "
        "proportion to a reward (GFlowNet fine-tuning: Hu et al., \"Amortizing intractable "
        "inference in large language models\", ICLR 2024).\n",
        "## Task\n", f"{task[0].upper()}{task[1:]}."
        + (f" Prompt: `{prompt!r}`." if prompt else "") + "\n",
        "## Objective\n", OBJECTIVES[cfg.objective.loss].format(**cfg.to_dict()) + ".\n",
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
