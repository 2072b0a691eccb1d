"""The frozen reward LM of the tasks scored by one (continuation, reasoning).

``reward_model: initial`` (the default) is the initial policy, frozen: a copy of it, or with
LoRA the policy itself with its adapters disabled (no second copy). Any other value names a
causal LM with the policy's vocabulary (hub name, directory or .gguf), loaded frozen in the
policy's dtype, never with LoRA. Under ZeRO-3 the reward LM is partitioned like the policy
(each rank holds 1/world of its weights) and runs through an optimizer-less DeepSpeed engine
that gathers each layer for its forward; otherwise it is a plain replica on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from fastgfn.trainer.engines.distributed import zero3_init_context, zero_stage
from fastgfn.trainer.model.loading import eval_mode, load_model


@dataclasses.dataclass
class RewardLM:
    """A frozen causal LM that scores continuations."""

    model: torch.nn.Module
    adapters_off: bool = False  # the policy with its LoRA adapters disabled
    engine: object = None  # ZeRO-3: the inference engine that owns the partitioned model

    @contextlib.contextmanager
    def frozen(self):
        """``(model, device)``: the reward LM in eval mode (adapters disabled) inside the block."""
        ctx = self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with eval_mode(self.model), ctx:
            yield self.model, next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def build_reward_lm(cfg, policy, tokenizer, ds_config: dict | None) -> RewardLM:
    """The frozen reward LM for ``cfg`` (see the module docstring); ``policy`` is the initial
    policy as loaded (before any engine wraps it)."""
    if cfg.model.lora and cfg.task.reward_model == "initial":
        return RewardLM(policy, adapters_off=True)
    stage = zero_stage(ds_config)
    other = cfg.task.reward_model != "initial"
    # A whole policy (any stage but 3, or the tiny test model, built whole) is copied; a
    # ZeRO-3 policy is already partitioned, so the initial weights are loaded again.
    if not other and (stage != 3 or cfg.model.name == "tiny"):
        reward = copy.deepcopy(policy)
    else:
        load_cfg = cfg
        if other:
            load_cfg = cfg.replace(model=cfg.task.reward_model, gguf_file=None, lora=False)
        with zero3_init_context(ds_config):
            reward, _ = load_model(load_cfg, tokenizer=False)
    check_reward_vocab(cfg, reward, tokenizer)
    reward.eval().requires_grad_(False)
    if stage != 3:
        return RewardLM(reward)
    from fastgfn.trainer.engines.deepspeed_engine import frozen_zero3_module

    engine = frozen_zero3_module(reward, ds_config)
    return RewardLM(engine.module, engine=engine)


def check_reward_vocab(cfg, reward, tokenizer) -> None:
    """A reward LM scores the policy's token ids: its vocabulary must cover the policy's."""
    want = len(tokenizer) if tokenizer is not None else None
    got = int(reward.config.vocab_size)
    if want is not None and got < want:
        raise ValueError(
            f"reward_model: {cfg.task.reward_model!r} has a vocabulary of {got} tokens, "
            f"fewer than the policy's tokenizer ({want}); the reward LM must share the "
            "policy's tokenizer"
        )
