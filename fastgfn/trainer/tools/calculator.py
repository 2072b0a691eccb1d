"""The calculator of the arithmetic task (Hu et al. 2024, section 4.4): integer + and -.

A rationale in the data's format is a list of steps ``"6 - 0 =, 6 - 4 =, 2 - 8 ="``; after
each "=" the calculator appends the step's result, so the policy reads
``"6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"``. The expression of a step is the text between the last
"," or "=" before the trigger and the trigger itself (so ``"4 + 5 = 9 - 3 ="`` chains).

``evaluate`` is the calculator's own parser, a scanner over the characters (never ``eval``,
never Python's parser or ``int()``):

    expression := ' '* operand (' '* op ' '* operand)* ' '*
    operand    := '-'? digit{1..max_digits}     (a sign only directly before its digits)
    op         := '+' | '-'

with between ``min_operands`` and ``max_operands`` operands (default exactly 2: the "=" after
a binary operation; the paper's tool had the same two-operand limit, ``limit_capability=2``,
and evaluated the last two operands of a longer expression; this one gives no result
instead). After an operand a "-" is always the operator, so ``"6 -4"`` is 6 - 4 and
``"6 - -4"`` is 6 - (-4). Anything else is no result (``None``): the empty string, a dangling
operator or sign (``"6 +"``, ``"- 4"``), two operators in a row, letters, other characters
(including non-ASCII digits), an operand longer than ``max_digits`` (no overflow-size
numbers), too few or too many operands.
"""

from __future__ import annotations

from fastgfn.trainer.tools import Tool

DIGITS = "0123456789"
SEPARATORS = ",="


def evaluate(expression: str, *, max_operands: int = 2, min_operands: int = 2,
             max_digits: int = 6) -> int | None:
    """The value of ``expression`` (the grammar above), or None when it is malformed."""
    if not isinstance(expression, str):
        return None
    operands, ops = _scan(expression, max_digits)
    if operands is None or not min_operands <= len(operands) <= max_operands:
        return None
    value = operands[0]
    for op, x in zip(ops, operands[1:]):
        value = value + x if op == "+" else value - x
    return value


def _scan(text: str, max_digits: int):
    """``(operands, operators)`` of ``text``, or ``(None, None)`` when malformed."""
    operands, ops = [], []
    i, n = 0, len(text)
    expect_operand = True
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i == n:
            break
        if expect_operand:
            value, i = _operand(text, i, max_digits)
            if value is None:
                return None, None
            operands.append(value)
        elif text[i] in "+-":
            ops.append(text[i])
            i += 1
        else:
            return None, None
        expect_operand = not expect_operand
    if expect_operand:  # empty, or a dangling operator
        return None, None
    return operands, ops


def _operand(text: str, i: int, max_digits: int):
    """An operand starting at ``text[i]``: ``(value, next index)`` or ``(None, i)``."""
    sign = 1
    if text[i] == "-":
        sign, i = -1, i + 1
    start, value = i, 0
    while i < len(text) and text[i] in DIGITS:
        value = 10 * value + DIGITS.index(text[i])
        i += 1
    if i == start or i - start > max_digits:
        return None, i
    return sign * value, i


def step_expression(rationale: str) -> str | None:
    """The expression a trigger "=" at the end of ``rationale`` closes: the text after the last
    "," or "=" before it; None when ``rationale`` does not end with "="."""
    if not rationale.endswith("="):
        return None
    body = rationale[:-1]
    cut = max(body.rfind(s) for s in SEPARATORS)
    return body[cut + 1:]


def result_text(value: int) -> str:
    """What the calculator appends after "=": a space and the integer."""
    return f" {value}"


def complete_rationale(rationale: str, **limits) -> str:
    """A rationale in the data's format with the calculator's results filled in after every
    "=" that closes a well-formed step (what sampling with the tool produces):
    ``"6 - 0 =, 6 - 4 ="`` -> ``"6 - 0 = 6, 6 - 4 = 2"``."""
    out = ""
    for ch in rationale:
        out += ch
        if ch == "=":
            value = evaluate(step_expression(out) or "", **limits)
            if value is not None:
                out += result_text(value)
    return out


class CalculatorTool(Tool):
    """The calculator as a sampler ``Tool`` over a tokenizer's token ids."""

    name = "calculator"

    def __init__(self, tokenizer, *, max_operands: int = 2, max_digits: int = 6):
        if max_operands < 2:
            raise ValueError(f"tool_max_operands: must be >= 2, got {max_operands}")
        if max_digits < 1:
            raise ValueError(f"tool_max_digits: must be >= 1, got {max_digits}")
        self.tokenizer = tokenizer
        self.max_operands, self.max_digits = max_operands, max_digits
        # a space, a sign and the digits of a sum of max_operands operands (at most one
        # token a character)
        self.max_result_tokens = 2 + max_digits + len(str(max_operands))
        self.trigger_ids = frozenset(trigger_token_ids(tokenizer))
        if not self.trigger_ids:
            raise ValueError("tool: the tokenizer has no token that is '=' (the calculator's "
                             "trigger)")
        self._encoded: dict[int, list[int]] = {}

    def value(self, context: list[int]) -> int | None:
        """The value the calculator computes for ``context`` (None: no result)."""
        expression = step_expression(self.tokenizer.decode(context))
        if expression is None:
            return None
        return evaluate(expression, max_operands=self.max_operands,
                        max_digits=self.max_digits)

    def result_tokens(self, context: list[int]) -> list[int]:
        value = self.value(context)
        if value is None:
            return []
        if value not in self._encoded:
            ids = self.tokenizer.encode(result_text(value), add_special_tokens=False)
            self._encoded[value] = [int(t) for t in ids]
        return list(self._encoded[value])


def trigger_token_ids(tokenizer) -> list[int]:
    """The tokens that are "=" after optional leading spaces ("=", " =")."""
    n = len(tokenizer)
    return [i for i in range(n) if tokenizer.decode([i]).lstrip(" ") == "="]
