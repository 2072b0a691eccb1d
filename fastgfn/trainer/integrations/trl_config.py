"""``GFNConfig``: the arguments of ``GFNTrainer``, a TRL config (``TrainingArguments`` plus TRL's
defaults, through TRL's ``_BaseConfig``) with the GFlowNet keys of fastgfn's engine under the
same names (``loss``, ``subtb_lambda``, ``log_z_lr``, ``reward_temperature``, ``explore_*``,
``replay_*``) and TRL's names where TRL has one (``num_generations``,
``max_completion_length``, ``reward_weights``, ``model_init_kwargs``). Every bad value is a
``ValueError`` that names the field. Written for ``trl==1.16.0``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl.trainer.base_config import _BaseConfig

from fastgfn.trainer.sections import LOSSES, PREFIX_LOSSES


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class GFNConfig(_BaseConfig):
    """Configuration of :class:`fastgfn.trainer.integrations.trl.GFNTrainer`.

    The reward functions' weighted sum is the **log**-reward: the trainer fits a policy that
    samples a completion ``z`` with probability proportional to
    ``exp(sum_i w_i r_i(z) / reward_temperature)``.
    """

    # model and data ----------------------------------------------------------------------
    model_init_kwargs: dict | None = field(
        default=None, metadata=_help("kwargs of from_pretrained when `model` is a name"))
    remove_unused_columns: bool = field(
        default=False, metadata=_help("keep the dataset's columns: reward functions get them"))
    disable_dropout: bool = field(
        default=True, metadata=_help("dropout off: the scoring pass must match sampling"))
    shuffle_dataset: bool = field(default=True, metadata=_help("shuffle the prompts"))
    # sampling ----------------------------------------------------------------------------
    num_generations: int = field(
        default=8, metadata=_help("completions per prompt (a group; VarGrad's log Z is per group)"))
    max_completion_length: int = field(default=64, metadata=_help("new tokens at most"))
    min_completion_length: int = field(
        default=1, metadata=_help("termination forbidden before this many new tokens"))
    termination: str | None = field(
        default=None,
        metadata=_help("the termination (stop) token's text; default: the tokenizer's eos"))
    explore_prob: float = field(
        default=0.25, metadata=_help("probability that a row is sampled tempered"))
    explore_temp_low: float = field(default=1.0, metadata=_help("tempered rows: lowest T"))
    explore_temp_high: float = field(default=1.5, metadata=_help("tempered rows: highest T"))
    explore_vocab_ids: list[int] | None = field(
        default=None, metadata=_help("token ids a fraction explore_vocab_prob of rows is "
                                     "restricted to (the termination token is added)"))
    explore_vocab_prob: float = field(
        default=0.5, metadata=_help("fraction of rows restricted to explore_vocab_ids"))
    replay_prob: float = field(
        default=0.5, metadata=_help("probability that a group is replayed from the buffer"))
    replay_size: int = field(
        default=128, metadata=_help("replay buffer: best distinct completions per prompt"))
    replay_min_distance: int = field(
        default=0, metadata=_help("replay buffer: near-duplicate token edit distance"))
    # objective ---------------------------------------------------------------------------
    loss: str = field(
        default="vargrad", metadata=_help(
            "vargrad (log Z from each group), tb (one learned log Z), subtb or db (score "
            "every prefix of every completion with the reward functions)"))
    subtb_lambda: float = field(default=1.0, metadata=_help("SubTB's lambda"))
    log_z_init: float = field(default=0.0, metadata=_help("initial log Z (tb; subtb/db s0)"))
    log_z_lr: float = field(default=0.1, metadata=_help("log Z's own Adam learning rate"))
    log_z_auto_init: bool = field(
        default=False, metadata=_help("set log Z from the first batch (tb; subtb/db s0)"))
    reward_weights: list[float] | None = field(
        default=None, metadata=_help("one weight per reward function (default: all 1)"))
    reward_temperature: float = field(
        default=1.0, metadata=_help("log R is divided by this temperature"))
    reward_temperature_end: float | None = field(
        default=None, metadata=_help("linear schedule of the temperature to this value"))
    reward_temperature_steps: int = field(
        default=0, metadata=_help("optimizer steps of that schedule"))
    use_fused_logprobs: bool = field(
        default=True, metadata=_help("log-probs fused with the lm_head (no [tokens, V] logits)"))

    def __post_init__(self):
        super().__post_init__()
        check_gfn_config(self)


def _positive(cfg, *names) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}: must be finite and > 0, got {v!r}")


def check_gfn_config(cfg: GFNConfig) -> None:
    """The GFlowNet fields' ranges and choices (``ValueError`` naming the field)."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss: must be one of {LOSSES}, got {cfg.loss!r}")
    _positive(cfg, "num_generations", "max_completion_length", "explore_temp_low",
              "explore_temp_high", "replay_size", "reward_temperature")
    for name in ("explore_prob", "explore_vocab_prob", "replay_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name}: must be a probability in [0, 1], got {getattr(cfg, name)!r}")
    if not 0 <= cfg.min_completion_length <= cfg.max_completion_length:
        raise ValueError(f"min_completion_length: must be in [0, max_completion_length "
                         f"({cfg.max_completion_length})], got {cfg.min_completion_length}")
    if cfg.explore_temp_low > cfg.explore_temp_high:
        raise ValueError(f"explore_temp_low: must be <= explore_temp_high "
                         f"({cfg.explore_temp_high}), got {cfg.explore_temp_low}")
    if cfg.loss == "vargrad" and cfg.num_generations < 2:
        raise ValueError("num_generations: vargrad estimates log Z from each group of "
                         f"completions of one prompt, so it needs >= 2, got {cfg.num_generations}")
    if cfg.per_device_train_batch_size % cfg.num_generations:
        raise ValueError(
            f"per_device_train_batch_size: must be a multiple of num_generations "
            f"({cfg.num_generations}) so each process holds whole groups, got "
            f"{cfg.per_device_train_batch_size}")
    if cfg.reward_temperature_end is not None:
        _positive(cfg, "reward_temperature_end")
    for name in ("subtb_lambda", "log_z_lr", "replay_min_distance", "reward_temperature_steps"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(cfg, name)!r}")


def check_dataset(name: str, dataset) -> None:
    """A ``datasets.Dataset`` with a ``prompt`` column (``TypeError``/``ValueError`` naming
    ``name``)."""
    from datasets import Dataset

    if dataset is None:
        raise ValueError(f"{name}: required (a datasets.Dataset with a 'prompt' column)")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{name}: must be a datasets.Dataset with a 'prompt' column, got "
                        f"{type(dataset).__name__}")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name}: has no 'prompt' column (columns: {dataset.column_names})")


def objective_config(args: GFNConfig, dataset):
    """The engine's config with the objective and sampling sections the ``Objective`` reads,
    from the TRL config and the training prompts. With
    several distinct prompts SubTB/DB take s0's flow from the policy itself, as the engine does
    (no log Z; states shorter than the minimum length get the floor reward); with one prompt,
    and for TB, one learned scalar log Z (right for one prompt, or prompts with similar
    normalisers)."""
    several = len({repr(row["prompt"]) for row in dataset}) > 1
    from fastgfn.trainer.config import Config

    return Config(
        loss=args.loss, subtb_lambda=args.subtb_lambda, log_z_init=args.log_z_init,
        log_z_lr=args.log_z_lr, log_z_auto_init=args.log_z_auto_init,
        min_new_tokens=args.min_completion_length, max_new_tokens=args.max_completion_length,
        reward_temperature=args.reward_temperature,
        reward_temperature_end=args.reward_temperature_end,
        reward_temperature_steps=args.reward_temperature_steps, dead_ends=False,
        initial_flow="policy" if args.loss in PREFIX_LOSSES and several else "global_log_z",
        min_length_log_reward=-99.0)
