"""The typed sections of a training configuration (``fastgfn.trainer.config.Config``): what
loads the model, how batches are sampled, the objective, the optimiser, the evaluation and
the run. The task's options are a section too, owned by the task (``tasks/options.py`` and
each task's ``Options``). The YAML keys are flat: every key names one field of one section
under the same name (``model`` and ``task`` are the sections' ``name``).

Each section checks its own ranges and choices (``check``); checks that tie sections
together are in ``config.validate``. Every error names the offending key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastgfn.trainer.errors import ConfigError

# the GFlowNet losses of the engine and the TRL trainer; those that read every prefix's reward
LOSSES = ("subtb", "tb", "vargrad", "db")
PREFIX_LOSSES = ("subtb", "db")


class Section:
    """Range and choice rules a section declares as class attributes; ``check`` applies them."""

    CHOICES: dict[str, tuple] = {}
    POSITIVE: tuple[str, ...] = ()
    NON_NEGATIVE: tuple[str, ...] = ()
    FINITE: tuple[str, ...] = ()
    PROBABILITIES: tuple[str, ...] = ()

    def check(self) -> None:
        for key, choices in self.CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}: must be one of {choices}, got {getattr(self, key)!r}")
        for key in self.POSITIVE:
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key}: must be finite and > 0, got {value!r}")
        for key in self.NON_NEGATIVE:
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key}: must be finite and >= 0, got {value!r}")
        for key in self.FINITE:
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key}: must be a finite number, got {getattr(self, key)!r}")
        for key in self.PROBABILITIES:
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(
                    f"{key}: must be a probability in [0, 1], got {getattr(self, key)!r}")


@dataclass
class ModelSection(Section):
    """The policy: which model, how it is loaded, LoRA."""

    name: str = "smollm2"  # key `model`: "smollm2" (packaged GGUF), "tiny", a hub name, a
    #   directory or a .gguf file
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

    CHOICES = {"dtype": ("float32", "bfloat16", "float16"), "mixed_precision": ("no", "bf16"),
               "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2")}
    POSITIVE = ("tiny_hidden", "tiny_layers", "lora_r")
    NON_NEGATIVE = ("lora_dropout",)
    FINITE = ("lora_alpha",)


@dataclass
class SamplingSection(Section):
    """Where batches come from: the behaviour policy's rollouts and the replay buffer."""

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

    CHOICES = {"explore_mode": ("per_row", "per_batch"),
               "sample_dtype": ("auto", "model", "float32", "bfloat16", "float16"),
               "replay_sampling": ("uniform", "reward")}
    POSITIVE = ("batch_size", "max_new_tokens", "explore_temp_low", "explore_temp_high",
                "replay_size")
    NON_NEGATIVE = ("min_new_tokens", "replay_min_distance")
    PROBABILITIES = ("explore_prob", "replay_prob", "explore_vocab_prob",
                     "replay_relative_distance")

    def check(self) -> None:
        super().check()
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens: must be <= max_new_tokens "
                              f"({self.max_new_tokens}), got {self.min_new_tokens}")
        if self.explore_temp_low > self.explore_temp_high:
            raise ConfigError(f"explore_temp_low: must be <= explore_temp_high "
                              f"({self.explore_temp_high}), got {self.explore_temp_low}")


@dataclass
class ObjectiveSection(Section):
    """The GFlowNet loss, its flows and the reward's temperature."""

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
    reward_temperature: float = 1.0
    reward_temperature_end: float | None = None  # linear schedule to this value
    reward_temperature_steps: int = 0
    use_fused_logprobs: bool = True

    CHOICES = {"loss": LOSSES, "initial_flow": ("auto", "policy", "log_z", "global_log_z")}
    POSITIVE = ("reward_temperature", "subtb_lambda")
    NON_NEGATIVE = ("log_z_lr", "reward_temperature_steps")
    FINITE = ("log_z_init",)

    def check(self) -> None:
        super().check()
        floor = self.min_length_log_reward
        if floor is not None and not (math.isfinite(floor) and floor <= 0):
            raise ConfigError(f"min_length_log_reward: must be finite and <= 0, got {floor}")
        end = self.reward_temperature_end
        if end is not None and not (end > 0 and math.isfinite(end)):
            raise ConfigError(f"reward_temperature_end: must be finite and > 0, got {end!r}")


@dataclass
class OptimisationSection(Section):
    """The optimiser, its schedule and the guards of a step."""

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

    CHOICES = {"lr_schedule": ("constant", "cosine", "linear")}
    POSITIVE = ("steps", "lr", "grad_accum", "max_nonfinite_steps")
    NON_NEGATIVE = ("warmup_steps", "grad_clip", "weight_decay")
    PROBABILITIES = ("lr_min_ratio",)


@dataclass
class EvaluationSection(Section):
    """The evaluation before, during and after training, and the pictures."""

    eval_samples: int = 4096
    eval_batch_size: int = 1024
    eval_before: bool = True
    eval_questions: int = 200  # reasoning: how many questions for the answer accuracy (0: all)
    eval_rationales: int = 4  # reasoning: rationales sampled per question (0: no accuracy)
    eval_every: int = 0
    histogram: bool = True
    training_curves: bool = True  # training_curves.png at the end (plots.py)

    POSITIVE = ("eval_batch_size",)
    NON_NEGATIVE = ("eval_samples", "eval_every", "eval_questions", "eval_rationales")


@dataclass
class RunSection(Section):
    """The process, its randomness, logging, checkpoints and outputs."""

    seed: int = 0
    same_data_all_ranks: bool = False  # every rank samples the same data (tests)
    device: str = "auto"  # one plain process: "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    num_threads: int = 0  # torch CPU threads; 0: leave torch's default
    malloc_reuse: bool = True  # on the CPU, glibc's malloc keeps freed memory for the next
    #   step instead of returning it (engines/host_memory.py: fewer page faults, a faster step)
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

    POSITIVE = ("keep_checkpoints",)
    NON_NEGATIVE = ("save_every", "num_threads")

    def check(self) -> None:
        super().check()
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# the sections every run has, by attribute name (the task's section is ``task``)
SECTIONS = {"model": ModelSection, "sampling": SamplingSection, "objective": ObjectiveSection,
            "optimisation": OptimisationSection, "evaluation": EvaluationSection,
            "run": RunSection}
