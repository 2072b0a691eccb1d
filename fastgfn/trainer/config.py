"""The training configuration: one typed dataclass with every key a run reads, and the checks
of ranges and choices that run before anything loads. Every error names the offending key.
Loading (YAML, ``key=value`` overrides, path resolution) is ``fastgfn.trainer.config_loading``.

    from fastgfn.trainer import load_config
    cfg = load_config("configs/random_number.yaml", ["steps=10", "lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.metrics_log import resolve_report_to


@dataclass
class Config:
    # model -------------------------------------------------------------------------------
    model: str = "smollm2"  # "smollm2" (packaged GGUF), "tiny", a hub name, a directory or a .gguf
    gguf_file: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # "auto" (flash_attention_2 when flash-attn is installed
    #   and the model is 16-bit on CUDA, else sdpa), "sdpa", "eager" or "flash_attention_2"
    dtype: str = "float32"  # float32, bfloat16, float16
    mixed_precision: str = "no"  # "bf16": a micro-step under torch.autocast(bfloat16), fp32
    #   master weights (needs dtype=float32; one plain process; GPUs and CPUs with native bf16)
    tiny_hidden: int = 64
    tiny_layers: int = 2
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    # task --------------------------------------------------------------------------------
    task: str = "random_number"  # "random_number", "continuation", "reasoning", "infilling"
    #   or "arithmetic"
    data_path: str | None = None  # continuation: prompts, one a line; reasoning: .json / .jsonl
    heldout_fraction: float = 0.05  # continuation: prompts held out of training (the paper's
    #   code trains on 95%), for `python -m fastgfn.trainer.continuation_eval`
    heldout_seed: int = 0  # continuation: the split's own seed (not `seed`); < 0: the last
    #   prompts of the file, as the paper's code splits
    question_key: str = "question"  # reasoning: the data's question and answer fields
    answer_key: str = "answer"
    story_columns: list[str] = field(default_factory=lambda: [
        f"sentence{i}" for i in range(1, 6)])  # infilling: the story's sentence columns in
    #   order (ROCStories' sentence1..sentence5; a comma list or a YAML list)
    infill_column: str = "sentence4"  # infilling: the missing middle; before it X, after it Y
    prompt_template: str = "{question}"  # reasoning: the prompt X before the rationale;
    #   infilling: the policy's prompt from {beginning} and {ending}
    answer_template: str = " The answer is {answer}."  # reasoning: Y, scored after X z STOP
    wrong_answer_log_penalty: float = 0.0  # reasoning: subtracted from log R(prefix) when the
    #   reward LM finds another choice likelier than the answer after it (the paper's SUBJ: 50)
    rationale_key: str = "str_rationale"  # arithmetic: the worked rationale of the few-shot
    #   examples (the data's format "6 - 0 =, 6 - 4 =", tool results filled in)
    fewshot_examples: int = 3  # arithmetic: examples in the reward LM's few-shot prompt
    fewshot_path: str | None = None  # arithmetic: where they come from (default: data_path)
    fewshot_in_policy: bool = False  # arithmetic: the policy's prompt has the few-shot prefix
    #   too (the paper's policy sees the question only; its reward LM sees the examples)
    tool: str = "none"  # "none" or "calculator": run by the sampler after its trigger tokens
    tool_max_operands: int = 2  # calculator: operands of one step (2: a binary operation)
    tool_max_digits: int = 6  # calculator: longer operands give no result
    prompt: str | None = None
    termination: str = ","
    task_low: int = 0
    task_high: int = 100
    invalid_log_reward: float = -20.0
    reward_model: str = "initial"  # reward-LM tasks: "initial" (frozen copy of the initial policy)
    #   or another causal LM with the policy's vocabulary (hub name, directory or .gguf file)
    illegal_token_bias: float = -50.0  # continuation: added to the reward LM's logits of
    #   illegal tokens (special tokens, line breaks, other tokens containing the termination)
    illegal_token_bias_in_policy: bool = True  # the paper's behaviour: the policy is the LM's
    #   logits plus the same bias, when it samples (before the temperature) and when it is scored
    reward_temperature: float = 1.0
    reward_temperature_end: float | None = None  # linear schedule to this value
    reward_temperature_steps: int = 0
    # sampling ----------------------------------------------------------------------------
    batch_size: int = 32
    max_new_tokens: int = 4
    min_new_tokens: int = 1
    explore_prob: float = 0.25
    explore_temp_low: float = 1.0
    explore_temp_high: float = 1.5
    explore_mode: str = "per_row"  # "per_row": each row tempered with probability explore_prob;
    #   "per_batch" (the paper's): one temperature for the whole batch, with that probability
    explore_vocab_prob: float = 0.5  # rows sampled with the vocabulary restricted to the task's
    #                                  allowed tokens (the random-number task: digits + termination)
    replay_prob: float = 0.5
    sample_dtype: str = "auto"  # "model": sample with the policy itself; "bfloat16"/"float16":
    #   with a low-precision replica synced every step (off-policy); "auto": a bf16 replica
    #   for an fp32 policy on a CPU with native bf16 matmuls (not ZeRO-3), else "model"
    compile_sampler: bool = False  # torch.compile the sampling replica's decoder (one-time
    #                                compile of minutes; faster decoding in long runs)
    dead_ends: bool = True  # end trajectories at states that can never become valid (if the
    #                         task can tell): a forced stop there with the invalid reward
    replay_size: int = 128
    replay_min_distance: int = 0  # near-duplicate threshold (token edit distance); 0: exact only
    replay_relative_distance: float = 0.0  # near-duplicate when the edit distance is below this
    #   fraction of the two lengths' sum (the paper's 0.25); 0: off
    replay_sampling: str = "uniform"  # uniform | reward (probability exp(log R), the paper's)
    replay_seed: bool = False  # start the buffer with the task's worked rationales (arithmetic:
    #   rationale_key of data_path, through the tool), as the paper's code does
    # loss --------------------------------------------------------------------------------
    loss: str = "subtb"  # "subtb", "tb", "vargrad", "db"
    subtb_lambda: float = 1.0
    log_z_init: float = 0.0
    log_z_auto_init: bool = False  # at the first step set log Z to the first batch's mean of
    #   log R(z) - log q(z): the TB-optimal log Z for the initial policy (log_z_init ignored)
    log_z_lr: float = 0.1
    initial_flow: str = "auto"  # the flow of the empty state s0 (docs/MATH.md §3): "policy"
    #   (log F(s0|X) = log R_floor - log q(STOP|s0,X), per prompt), "log_z" (a learned log Z per
    #   prompt), "global_log_z" (one learned scalar for every prompt: right for one prompt only);
    #   "auto": "policy" for tasks with several prompts, "log_z" for one
    min_length_log_reward: float | None = -99.0  # log-reward of states shorter than
    #   min_new_tokens (before tempering; the paper's -99): they stay in the loss, so q(STOP)
    #   there is driven to 0; None (null): they keep their raw reward (no floor)
    # optimisation ------------------------------------------------------------------------
    steps: int = 150
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # "constant", "cosine" or "linear" (decay to lr * lr_min_ratio
    #                              at steps)
    lr_min_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_nonfinite_steps: int = 10  # stop with an error after this many skipped steps in a row
    #   (a step whose loss, gradient norm or used rewards are not finite is skipped)
    seed: int = 0
    same_data_all_ranks: bool = False  # every rank samples the same data (tests)
    device: str = "auto"  # one plain process: "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    num_threads: int = 0  # torch CPU threads; 0: leave torch's default
    use_fused_logprobs: bool = True
    # evaluation --------------------------------------------------------------------------
    eval_samples: int = 4096
    eval_batch_size: int = 1024
    eval_before: bool = True
    eval_data_path: str | None = None  # reasoning: questions for the answer accuracy (default:
    #   the training questions)
    eval_questions: int = 200  # reasoning: how many of them (0: all)
    eval_rationales: int = 4  # reasoning: rationales sampled per question (0: no accuracy)
    eval_every: int = 0
    histogram: bool = True
    training_curves: bool = True  # training_curves.png at the end (plots.py)
    # run, logging and checkpoints -------------------------------------------------------
    output_dir: str = "runs/default"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    allow_config_change: bool = False  # resume: apply settings that differ from the
    #   checkpoint's (refused without it, except steps, logging, evaluation and paths)
    stop_after_steps: int = 0  # checkpoint and exit after this many steps of this invocation
    save_model: bool = True  # at the end, the fine-tuned model as a Hugging Face directory
    export_dir: str | None = None  # where it goes (default: <output_dir>/model)
    report_to: list[str] = field(default_factory=lambda: ["none"])  # logging targets beside
    #   metrics.jsonl: none, tensorboard, wandb, or several (a comma list or a YAML list)
    tensorboard: bool | None = None  # deprecated: report_to=tensorboard / report_to=none
    progress: bool = True
    deepspeed_config: str | None = None
    extra: dict = field(default_factory=dict)  # free-form, unvalidated

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def model_dir(self) -> Path:
        """Where the run's fine-tuned Hugging Face model is written at the end."""
        return Path(self.export_dir) if self.export_dir else Path(self.output_dir) / "model"


_CHOICES = {
    "loss": ("subtb", "tb", "vargrad", "db"),
    "initial_flow": ("auto", "policy", "log_z", "global_log_z"),
    "explore_mode": ("per_row", "per_batch"),
    "dtype": ("float32", "bfloat16", "float16"),
    "mixed_precision": ("no", "bf16"),
    "sample_dtype": ("auto", "model", "float32", "bfloat16", "float16"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "lr_schedule": ("constant", "cosine", "linear"),
    "tool": ("none", "calculator"),
    "replay_sampling": ("uniform", "reward"),
}
_POSITIVE = (
    "batch_size", "max_new_tokens", "steps", "lr", "grad_accum", "eval_batch_size",
    "reward_temperature", "explore_temp_low", "explore_temp_high", "tiny_hidden",
    "tiny_layers", "lora_r", "replay_size", "keep_checkpoints", "subtb_lambda",
    "max_nonfinite_steps", "tool_max_digits",
)
_NON_NEGATIVE = (
    "min_new_tokens", "warmup_steps", "grad_clip", "weight_decay", "eval_samples",
    "eval_every", "eval_questions", "eval_rationales", "save_every", "log_z_lr",
    "replay_min_distance", "num_threads", "reward_temperature_steps", "lora_dropout",
    "wrong_answer_log_penalty",
)
_FINITE = ("log_z_init", "invalid_log_reward", "illegal_token_bias", "lora_alpha")
_PROBS = ("explore_prob", "replay_prob", "explore_vocab_prob", "lr_min_ratio",
          "replay_relative_distance")


def _check_numbers(cfg: Config) -> None:
    for key in _POSITIVE:
        value = getattr(cfg, key)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key}: must be finite and > 0, got {value!r}")
    for key in _NON_NEGATIVE:
        value = getattr(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key}: must be finite and >= 0, got {value!r}")
    for key in _FINITE:
        if not math.isfinite(getattr(cfg, key)):
            raise ConfigError(f"{key}: must be a finite number, got {getattr(cfg, key)!r}")
    for key in _PROBS:
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: must be a probability in [0, 1], got {getattr(cfg, key)!r}")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise ConfigError(
            f"min_new_tokens: must be <= max_new_tokens ({cfg.max_new_tokens}), "
            f"got {cfg.min_new_tokens}"
        )
    if cfg.explore_temp_low > cfg.explore_temp_high:
        raise ConfigError(
            f"explore_temp_low: must be <= explore_temp_high ({cfg.explore_temp_high}), "
            f"got {cfg.explore_temp_low}"
        )
    floor = cfg.min_length_log_reward
    if floor is not None and not (math.isfinite(floor) and floor <= 0):
        raise ConfigError(
            f"min_length_log_reward: must be finite and <= 0, got {cfg.min_length_log_reward}"
        )
    if cfg.illegal_token_bias > 0:
        raise ConfigError(f"illegal_token_bias: must be <= 0, got {cfg.illegal_token_bias}")
    if cfg.wrong_answer_log_penalty > 0 and cfg.task != "reasoning":
        raise ConfigError(f"wrong_answer_log_penalty: for the reasoning task's label sets, not "
                          f"task {cfg.task!r}")
    if cfg.task_low > cfg.task_high:
        raise ConfigError(f"task_low: must be <= task_high ({cfg.task_high}), got {cfg.task_low}")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction: must be in [0, 1), got {cfg.heldout_fraction!r}")
    end = cfg.reward_temperature_end
    if end is not None and not (end > 0 and math.isfinite(end)):
        raise ConfigError(f"reward_temperature_end: must be finite and > 0, got {end!r}")


def _check_tool(cfg: Config, task) -> None:
    from fastgfn.trainer.tasks.base import Task

    if cfg.tool_max_operands < 2:
        raise ConfigError(f"tool_max_operands: must be >= 2, got {cfg.tool_max_operands}")
    if cfg.tool != "none" and cfg.dead_ends and task.dead_index is not Task.dead_index:
        raise ConfigError(f"tool: task {cfg.task!r} has dead ends, which a tool does not "
                          "support; set dead_ends=false or tool=none")


def validate(cfg: Config) -> Config:
    """Check ranges, choices and the task's own keys; raise ``ConfigError`` naming the key."""
    from fastgfn.trainer.tasks import task_class

    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key}: must be one of {choices}, got {getattr(cfg, key)!r}")
    _check_numbers(cfg)
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not cfg.termination:
        raise ConfigError("termination: must name a token (for example ',' or 'eos')")
    if not isinstance(cfg.reward_model, str) or not cfg.reward_model:
        raise ConfigError(
            f"reward_model: must be 'initial' or a model name, directory or .gguf file, got "
            f"{cfg.reward_model!r}"
        )
    task = task_class(cfg.task)  # raises for an unknown task name
    if cfg.reward_model != "initial" and not task.needs_reward_model:
        raise ConfigError(
            f"reward_model: task {cfg.task!r} has no reward LM (only tasks scored by one take it)"
        )
    task.check_config(cfg)
    _check_tool(cfg, task)
    if cfg.attn_implementation == "flash_attention_2":
        from fastgfn.trainer.models import require_flash_attn

        require_flash_attn()
    resolve_report_to(cfg)
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(f"deepspeed_config: no such file {cfg.deepspeed_config!r}")
    _check_mixed_precision(cfg)
    return cfg


def _check_mixed_precision(cfg: Config) -> None:
    if cfg.mixed_precision == "no":
        return
    if cfg.dtype != "float32":
        raise ConfigError(
            f"mixed_precision: {cfg.mixed_precision!r} keeps fp32 master weights and needs "
            f"dtype=float32, got dtype={cfg.dtype!r}"
        )
    if cfg.deepspeed_config is not None:
        raise ConfigError(
            f"mixed_precision: {cfg.mixed_precision!r} is for one plain process; under DeepSpeed "
            "use the DeepSpeed config's bf16 section instead"
        )
