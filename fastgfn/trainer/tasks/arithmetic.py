"""Arithmetic with a calculator (Hu et al. 2024, section 4.4).

Questions "Question: 6 - 0 - 4 - 8 = ? Answer:" of 1-digit integers with + and -, with their
integer answers (the paper's ``arithmetic_with_tool`` files: ``str_query``, ``num_sol``, and
for the 50 training problems a worked rationale ``str_rationale`` such as
"6 - 0 =, 6 - 4 =, 2 - 8 ="). The policy writes a rationale step by step; with
``tool=calculator`` the sampler appends each step's result after its "=" (the results are
state, not actions), so a rationale reads " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6", and it ends with
the termination token ".". The answer Y is " The answer is -6." (``answer_template``).

The reward is the latent-reasoning one (``reasoning.LatentReasoningTask``, every prefix for
modified SubTB, one pass over the rationales for both terms),

    log R(z_1..z_t STOP) = log p_LM(z_1..z_t STOP | F X) + log p_LM(Y | F X z_1..z_t STOP),

with a few-shot prefix F that the reward LM reads before the question X: the first
``fewshot_examples`` (the paper's 3) problems of ``fewshot_path`` (default ``data_path``),
each "question worked-rationale. The answer is N." on its own line, the rationale's results
filled in by the calculator (``complete_rationale``), as the paper's reward prompt. The tool's
tokens are part of z and count in ``log p_LM(z ...)``, as in the paper's code.

The policy reads X only (the paper's setup: the fine-tuned policy answers zero-shot), or F X
with ``fewshot_in_policy=true``: a small model that cannot follow the format zero-shot then
starts from the few-shot baseline.

Illegal tokens: every token with a character outside " 0123456789+-=," (and special tokens),
except the termination token, gets ``illegal_token_bias`` on the reward LM's rationale
logits and, with ``illegal_token_bias_in_policy`` (the default), on the policy's: the paper's
vocabulary constraint (its ``vocab_alpha`` of -99 on tokens outside that set).

Accuracy: ``final_answer`` reads the number after the last "=" of a rationale (the last
result); ``python -m fastgfn.trainer.evaluation.arithmetic`` is the evaluation, and the trainer's
before/after table gets the greedy accuracy on the first ``eval_questions`` questions of
``eval_data_path`` (default: the training questions) from ``policy_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.tasks.data import load_examples, read_items
from fastgfn.trainer.tasks.reasoning import (
    LatentReasoningTask,
    ReasoningOptions,
)
from fastgfn.trainer.tools.calculator import complete_rationale, evaluate

ARITHMETIC_CHARS = frozenset(" 0123456789+-=,")


def final_answer(rationale: str) -> int | None:
    """The answer a rationale gives: the integer right after its last "=" (up to the next ","),
    or, with no "=", the text up to its first ","; None when that is not one integer."""
    cut = rationale.rfind("=")
    text = rationale[cut + 1:] if cut >= 0 else rationale
    text = text.split(",")[0].strip(" .")
    return evaluate(text, min_operands=1, max_operands=1, max_digits=18)


def load_fewshot(path, question_key: str, answer_key: str, rationale_key: str, k: int,
                 answer_template: str, termination: str, key: str = "fewshot_path") -> str:
    """The few-shot prefix: the first ``k`` problems of ``path``, each
    "question worked-rationale<termination><answer>" and a line break ("" for k = 0)."""
    if k <= 0:
        return ""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: no such data file {str(path)!r}")
    items = read_items(path, key)
    if not isinstance(items, list) or len(items) < k:
        raise ConfigError(f"fewshot_examples: {str(path)!r} holds fewer than {k} examples")
    lines = []
    for i, x in enumerate(items[:k]):
        missing = [f for f in (question_key, answer_key, rationale_key) if f not in x]
        if missing:
            raise ConfigError(f"{key}: item {i} of {str(path)!r} has no field {missing[0]!r} "
                              "(rationale_key, question_key, answer_key)")
        rationale = complete_rationale(str(x[rationale_key]))
        answer = answer_template.format(answer=x[answer_key])
        lines.append(f"{x[question_key]} {rationale}{termination}{answer}\n")
    return "".join(lines)


def encode_worked(tokenizer, rationale: str, results) -> tuple[list[int], list[bool]]:
    """A worked rationale "6 - 0 =, 6 - 4 =" as sampling with the tool produces it: each
    step's text up to its "=" encoded on its own (actions), then ``results(ids so far, text so
    far)``, the tool's result tokens after a step that ends with "=" (not actions; [] for
    none). ``(token ids, action mask)``, without the termination token."""
    ids, mask, text = [], [], ""
    pieces = (" " + rationale.strip()).split("=")
    for k, piece in enumerate(pieces):
        step = piece + ("=" if k < len(pieces) - 1 else "")
        if not step:
            continue
        new = tokenizer.encode(step, add_special_tokens=False)
        ids, mask, text = ids + new, mask + [True] * len(new), text + step
        if step.endswith("="):
            res = list(results(ids, text))
            ids, mask = ids + res, mask + [False] * len(res)
            text += tokenizer.decode(res) if res else ""
    return ids, mask


def sft_pairs(cfg, tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """The SFT baseline's examples (``python -m fastgfn.trainer.baselines.sft``): per training
    problem, ``(prompt ids, completion ids, loss mask)``. The prompt is the policy's (the
    question, after the few-shot prefix with ``fewshot_in_policy``); the completion is the
    worked rationale as sampling with the calculator produces it (``encode_worked``: the
    calculator's result tokens get mask 0, the policy never chooses them), then the
    termination token (in the loss)."""
    from fastgfn.trainer.tools.calculator import result_text, step_expression

    def results(ids, text):
        value = evaluate(step_expression(text) or "", max_operands=cfg.task.tool_max_operands,
                         max_digits=cfg.task.tool_max_digits)
        return [] if value is None else tokenizer.encode(result_text(value),
                                                         add_special_tokens=False)

    questions, _ = load_examples(cfg.task.data_path, cfg.task.question_key, cfg.task.answer_key)
    items = read_items(Path(cfg.task.data_path), "data_path")
    prefix = ArithmeticTask._fewshot(cfg) if cfg.task.fewshot_in_policy else ""
    term = tokenizer.encode(cfg.task.termination, add_special_tokens=False)
    out = []
    for i, (q, x) in enumerate(zip(questions, items)):
        if cfg.task.rationale_key not in x:
            raise ConfigError(f"data_path: item {i} has no field {cfg.task.rationale_key!r} "
                              "(rationale_key), which SFT needs")
        prompt = tokenizer.encode(prefix + cfg.task.prompt_template.format(question=q),
                                  add_special_tokens=False)
        ids, mask = encode_worked(tokenizer, str(x[cfg.task.rationale_key]), results)
        out.append((prompt, ids + term, [int(m) for m in mask] + [1] * len(term)))
    return out


def worked_rationales(cfg) -> list[str | None]:
    """Per training problem, its worked rationale (``rationale_key``), None where absent."""
    items = read_items(Path(cfg.task.data_path), "data_path")
    return [str(x[cfg.task.rationale_key]) if isinstance(x, dict) and x.get(cfg.task.rationale_key)
            else None for x in items]


@dataclass
class ArithmeticOptions(ReasoningOptions):
    rationale_key: str = "str_rationale"  # the worked rationale of the few-shot examples (the
    #   data's format "6 - 0 =, 6 - 4 =", tool results filled in)
    fewshot_examples: int = 3  # examples in the reward LM's few-shot prompt
    fewshot_path: str | None = None  # where they come from (default: data_path)
    fewshot_in_policy: bool = False  # the policy's prompt has the few-shot prefix too (the
    #   paper's policy sees the question only; its reward LM sees the examples)

    def check(self) -> None:
        super().check()
        if self.wrong_answer_log_penalty > 0:
            raise ConfigError("wrong_answer_log_penalty: for the reasoning task's label sets, "
                              "not task 'arithmetic'")
        if self.fewshot_examples < 0:
            raise ConfigError(f"fewshot_examples: must be >= 0, got {self.fewshot_examples}")


class ArithmeticTask(LatentReasoningTask):
    name = "arithmetic"
    Options = ArithmeticOptions
    description = ("write a rationale of calculator steps z for an arithmetic question X "
                   "that ends in its answer Y, sampled in proportion to p(z | X) p(Y | X z) "
                   "under the frozen reward LM with few-shot examples (section 4.4)")

    def __init__(self, tokenizer, questions, answers, reward, *, fewshot: str = "",
                 fewshot_in_policy: bool = False, eval_questions: list[str] | None = None,
                 eval_answers: list[str] | None = None, eval_max_new_tokens: int = 32,
                 eval_count: int = 0, worked: list[str | None] | None = None, **kwargs):
        super().__init__(tokenizer, questions, answers, reward, **kwargs)
        self.worked = worked  # per question, its worked rationale text (None: unknown)
        self.prompt_template = kwargs.get("prompt_template", "{question}")
        self.fewshot = fewshot
        self.fewshot_in_policy = bool(fewshot_in_policy)
        self._fewshot_ids = torch.tensor(
            tokenizer.encode(fewshot, add_special_tokens=False) if fewshot else [],
            dtype=torch.long)
        self._question_ids: dict[int, torch.Tensor] = {}
        self.eval_questions = list(questions if eval_questions is None else eval_questions)
        self.eval_answers = list(answers if eval_answers is None else eval_answers)
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_count = eval_count

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        cls._fewshot(cfg)  # read now: errors name the file before any model loads

    @staticmethod
    def _fewshot(cfg) -> str:
        return load_fewshot(cfg.task.fewshot_path or cfg.task.data_path, cfg.task.question_key,
                            cfg.task.answer_key, cfg.task.rationale_key, cfg.task.fewshot_examples,
                            cfg.task.answer_template, cfg.task.termination)

    def answer_task(self, cfg, tokenizer, reward):
        return None  # its accuracy on numbers is in policy_metrics

    @classmethod
    def sft_pairs(cls, cfg, tokenizer):
        return sft_pairs(cfg, tokenizer)

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None, choices=None):
        opts = cfg.task
        questions, answers = load_examples(opts.data_path, opts.question_key, opts.answer_key)
        eval_q = eval_a = None
        if cfg.task.eval_data_path:
            eval_q, eval_a = load_examples(cfg.task.eval_data_path, cfg.task.question_key,
                                           cfg.task.answer_key, "eval_data_path")
        return cls(
            tokenizer, questions, answers, reward,
            fewshot=cls._fewshot(cfg), fewshot_in_policy=cfg.task.fewshot_in_policy,
            eval_questions=eval_q, eval_answers=eval_a,
            eval_max_new_tokens=cfg.sampling.max_new_tokens,
            eval_count=cfg.evaluation.eval_questions,
            worked=worked_rationales(cfg),
            prompt_template=cfg.task.prompt_template, answer_template=cfg.task.answer_template,
            termination=cfg.task.termination, use_fused=cfg.objective.use_fused_logprobs,
            illegal_token_bias=cfg.task.illegal_token_bias,
            bias_in_policy=cfg.task.illegal_token_bias_in_policy,
        )

    # prompts ------------------------------------------------------------------------------
    def question_tokens(self, index: int) -> torch.Tensor:
        """X alone: the question's prompt text."""
        if index not in self._question_ids:
            self._question_ids[index] = torch.tensor(
                self.tokenizer.encode(self.prompts[index], add_special_tokens=False))
        return self._question_ids[index]

    def with_fewshot(self, ids: torch.Tensor) -> torch.Tensor:
        """The few-shot prefix F followed by ``ids``."""
        return torch.cat([self._fewshot_ids, ids.to(torch.long)])

    def prompt_tokens(self, index: int) -> torch.Tensor:
        """The policy's prompt: X, or F X with ``fewshot_in_policy``."""
        x = self.question_tokens(index)
        return self.with_fewshot(x) if self.fewshot_in_policy else x

    def reward_prompt_tokens(self, index: int) -> torch.Tensor:
        """The reward LM reads F X."""
        return self.with_fewshot(self.question_tokens(index))

    def worked_rows(self) -> list[tuple[list[int], list[bool]] | None] | None:
        """Per training question, its worked rationale as the sampler with this task's tool
        produces it (``encode_worked``: the tool's results are its own ``result_tokens``)."""
        if not self.worked or not any(self.worked):
            return None
        tool = self.tool()

        def results(ids, text):
            return tool.call(ids) if tool is not None and ids[-1] in tool.trigger_ids else []

        return [None if w is None else encode_worked(self.tokenizer, w, results)
                for w in self.worked[: self.num_prompts()]]

    # the vocabulary -----------------------------------------------------------------------
    def illegal_token_ids(self) -> list[int]:
        """Special tokens and every token with a character outside " 0123456789+-=,"; the
        termination token is legal."""
        if self._illegal is None:
            tok, V = self.tokenizer, self.vocab_size()
            special = set(getattr(tok, "all_special_ids", None) or [])
            special |= set(getattr(tok, "added_tokens_decoder", None) or {})
            n = min(len(tok), V)
            illegal = set(range(n, V)) | {i for i in special if 0 <= i < V}
            for i in range(n):
                text = tok.decode([i])
                if not text or not set(text) <= ARITHMETIC_CHARS:
                    illegal.add(i)
            illegal.discard(self.termination_token_id)
            self._illegal = sorted(illegal)
        return self._illegal

    # evaluation ---------------------------------------------------------------------------
    def evaluate(self, texts: list[str], terminated: list[bool]) -> dict:
        n = max(1, len(texts))
        metrics = super().evaluate(texts, terminated)
        metrics["with_answer_fraction"] = sum(final_answer(t) is not None for t in texts) / n
        return metrics

    @torch.no_grad()
    def decode(self, model, prompt_ids: torch.Tensor, temperatures: torch.Tensor, *,
               max_new_tokens: int, min_new_tokens: int, generator=None, param_context=None):
        """Rationales of the policy ``model`` for one prompt, one row per temperature (0:
        greedy), with the tool and the policy's logit bias: ``(rollout, texts, answers)``."""
        from fastgfn.trainer.sampling.policy import PolicyActions, sample_policy

        device = next(model.parameters()).device
        r = sample_policy(
            model, prompt_ids.to(device), temperatures.numel(), PolicyActions.of(self, device),
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            temperatures=temperatures.to(device), generator=generator,
            param_context=param_context,
        )
        texts = [self.text(row) for row in r.rows()]
        return r, texts, [final_answer(t) for t in texts]

    def question_prompt(self, question: str, fewshot: bool) -> torch.Tensor:
        """The policy's prompt for any question text, with or without the few-shot prefix."""
        ids = torch.tensor(self.tokenizer.encode(self.prompt_template.format(question=question),
                                                 add_special_tokens=False))
        return self.with_fewshot(ids) if fewshot else ids

    @torch.no_grad()
    def policy_metrics(self, engine, min_new_tokens: int) -> dict:
        """Greedy exact-match accuracy (tool active) on the first ``eval_questions``
        questions of ``eval_data_path`` (default: the training questions); {} when 0."""
        from fastgfn.trainer.model.loading import eval_mode

        count = min(self.eval_count, len(self.eval_questions))
        if count <= 0:
            return {}
        correct = 0
        with eval_mode(engine.module) as model:
            for q, a in zip(self.eval_questions[:count], self.eval_answers[:count]):
                _, _, answers = self.decode(
                    model, self.question_prompt(q, self.fewshot_in_policy), torch.zeros(1),
                    max_new_tokens=self.eval_max_new_tokens, min_new_tokens=min_new_tokens,
                    param_context=engine.param_context())
                correct += answers[0] is not None and str(answers[0]) == str(a).strip()
        return {"greedy_accuracy": correct / count, "greedy_accuracy_questions": count}
