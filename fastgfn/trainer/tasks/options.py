"""The task's section of the configuration. ``TaskOptions`` holds what every task has (its
name, the termination token, the sampler's tool); ``RewardLMOptions`` adds what every task
scored by a frozen reward LM has. Each task declares its own keys in a subclass, its
``Options`` (next to the task, in the task's module), with their checks; a key of one task is
read nowhere outside it (``tests/test_layout.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.sections import Section


@dataclass
class TaskOptions(Section):
    name: str = "random_number"  # key `task`: a name of ``fastgfn.trainer.tasks.TASKS``
    termination: str = ","  # the termination token's text ("eos": the tokenizer's EOS)
    tool: str = "none"  # "none" or "calculator": run by the sampler after its trigger tokens
    tool_max_operands: int = 2  # calculator: operands of one step (2: a binary operation)
    tool_max_digits: int = 6  # calculator: longer operands give no result

    CHOICES = {"tool": ("none", "calculator")}
    POSITIVE = ("tool_max_digits",)

    def check(self) -> None:
        super().check()
        if not self.termination:
            raise ConfigError("termination: must name a token (for example ',' or 'eos')")
        if self.tool_max_operands < 2:
            raise ConfigError(f"tool_max_operands: must be >= 2, got {self.tool_max_operands}")


@dataclass
class RewardLMOptions(TaskOptions):
    """Tasks scored by a frozen causal LM: their data and that LM."""

    data_path: str | None = None  # the task's data file (prompts, questions or stories)
    reward_model: str = "initial"  # "initial" (frozen copy of the initial policy) or another
    #   causal LM with the policy's vocabulary (hub name, directory or .gguf file)
    illegal_token_bias: float = -50.0  # added to the reward LM's logits of illegal tokens
    #   (special tokens, line breaks, other tokens containing the termination)
    illegal_token_bias_in_policy: bool = True  # the paper's behaviour: the policy is the LM's
    #   logits plus the same bias, when it samples (before the temperature) and when it is scored

    FINITE = ("illegal_token_bias",)

    def check(self) -> None:
        super().check()
        if not isinstance(self.reward_model, str) or not self.reward_model:
            raise ConfigError(f"reward_model: must be 'initial' or a model name, directory or "
                              f".gguf file, got {self.reward_model!r}")
        if self.illegal_token_bias > 0:
            raise ConfigError(f"illegal_token_bias: must be <= 0, got {self.illegal_token_bias}")


def check_heldout_fraction(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"heldout_fraction: must be in [0, 1), got {value!r}")
