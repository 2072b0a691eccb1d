"""Tools the policy calls while it samples: deterministic functions whose output becomes part
of the state but is not a policy action.

A ``Tool`` has

- ``trigger_ids``: the token ids after which it runs (the calculator's: the tokens that are
  "=" after optional leading spaces, the "=" that ends a binary operation in the arithmetic
  data's rationale format ``"6 - 0 =, 6 - 4 =, ..."``);
- ``max_result_tokens``: the most tokens one call may insert; a longer result counts as none;
- ``result_tokens(context)``: from the row's generated token ids so far (the trigger last) to
  the token ids to insert, ``[]`` for "no result".

The sampler (``fastgfn.trainer.sampling.sampler.sample(..., tool=...)``) calls ``call``, which
never raises: an exception inside a tool, a result that is not a list of ints or one longer
than ``max_result_tokens`` is "no result", and the row simply goes on. After a row's action
is a trigger, the result tokens are fed to that row one per decoding step as forced tokens:
they are part of the state (the policy sees them), never actions (no ``log_pf`` of theirs
enters the loss), and the rollout's ``action_mask`` marks them ``False``. ``max_new_tokens``
keeps counting actions, so a row holds at most ``max_new_tokens * (1 + max_result_tokens)``
tokens (``token_budget``).

``build_tool(cfg, tokenizer)`` is the run's tool (the ``tool`` config key: ``none`` or
``calculator``). The trainer gives it to every task through ``Task.tool()``.
"""

from __future__ import annotations

import warnings


class Tool:
    """A tool the sampler runs after a trigger action (see the module docstring)."""

    name = "tool"
    trigger_ids: frozenset[int] = frozenset()
    max_result_tokens: int = 0

    def result_tokens(self, context: list[int]) -> list[int]:
        """The token ids to insert after ``context`` (the row's generated tokens so far, the
        trigger last), ``[]`` for no result."""
        raise NotImplementedError

    def call(self, context: list[int]) -> list[int]:
        """``result_tokens`` that never raises: any exception, a result that is not a list of
        non-negative ints, or one longer than ``max_result_tokens`` is no result (``[]``)."""
        try:
            out = self.result_tokens(list(context))
        except Exception as exc:  # noqa: BLE001 (a tool must never stop the sampler)
            warnings.warn(f"tool {self.name!r} raised {type(exc).__name__}: {exc}; treated "
                          "as no result", RuntimeWarning, stacklevel=2)
            return []
        if not isinstance(out, (list, tuple)) or len(out) > self.max_result_tokens:
            return []
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in out):
            return []
        return list(out)


def token_budget(max_new_tokens: int, tool: Tool | None) -> int:
    """The most tokens a row can hold: ``max_new_tokens`` actions, each followed by at most
    one tool result."""
    if tool is None:
        return max_new_tokens
    return max_new_tokens * (1 + tool.max_result_tokens)


TOOLS = ("none", "calculator")


def build_tool(cfg, tokenizer) -> Tool | None:
    """The run's tool (``cfg.task.tool``), or None."""
    if cfg.task.tool == "none":
        return None
    if cfg.task.tool == "calculator":
        from fastgfn.trainer.tools.calculator import CalculatorTool

        return CalculatorTool(tokenizer, max_operands=cfg.task.tool_max_operands,
                              max_digits=cfg.task.tool_max_digits)
    raise ValueError(f"tool: must be one of {TOOLS}, got {cfg.task.tool!r}")


__all__ = ["TOOLS", "Tool", "build_tool", "token_budget"]
