"""Latent chain of thought (Hu et al. 2024, sections 4.3 and 4.4).

A data set of questions x with known answers y. The policy samples a rationale z after the
prompt X = ``prompt_template.format(question=x)``, ending with the termination token; the
target is the posterior over rationales that explain the answer,

    R(z) = p_LM(z STOP | X) * p_LM(Y | X z STOP),      Y = answer_template.format(answer=y),

under the frozen reward LM (a copy of the initial policy, another causal LM, or with LoRA the
policy with its adapters off). Modified SubTB needs the reward of stopping at every prefix,

    log R(z_1..z_t STOP) = log p_LM(z_1..z_t STOP | X) + log p_LM(Y | X z_1..z_t STOP),

t = 0..len(z). One teacher-forced pass over X z_1..z_T gives both terms: its hidden states
give the first (as in the continuation task), its KV cache the second. Each row's cache is
copied once per prefix t, the attention mask hides its positions past X z_1..z_t, and only
the 1 + |Y| tokens STOP Y run, at positions |X| + t onwards, for all (row, prefix) pairs in
one batch. The answer tokens' log-probs come through the fused lm_head op at the |Y| states
that predict them, so no [*, V] logits exist. The decoder calls (prompt, rationales,
suffixes) are the same whatever the data, so every ZeRO-3 rank makes the same calls.
The pass itself is the frozen LM's (``model.reward.RewardLM.score``, composed into the task);
the task says what to score: which context, which prefixes, which answers.

Illegal tokens in the rationale are handled as in the continuation task (``illegal_token_bias``
on the reward LM's rationale logits, restricted exploration through ``allowed_token_ids``); the
answer is fixed text and is scored without the bias.

Data: a ``.json`` file holding a list of objects or a ``.jsonl`` file of one object per line;
``question_key`` and ``answer_key`` name the fields (the paper's SUBJ files: ``text`` and
``label_text``; its arithmetic files: ``str_query`` and ``num_sol``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.tasks.continuation import ContinuationTask
from fastgfn.trainer.tasks.data import load_examples
from fastgfn.trainer.tasks.options import RewardLMOptions


def check_templates(prompt_template: str, answer_template: str) -> None:
    """Each template must have its slot: ``{question}`` and ``{answer}``."""
    if "{question}" not in prompt_template:
        raise ConfigError(f"prompt_template: must contain {{question}}, got {prompt_template!r}")
    if "{answer}" not in answer_template:
        raise ConfigError(f"answer_template: must contain {{answer}}, got {answer_template!r}")


def majority_vote(predictions: torch.Tensor, n_choices: int) -> torch.Tensor:
    """The most frequent choice in each row of ``predictions [n, k]`` (choice indices); ties
    go to the choice listed first."""
    counts = torch.stack([(predictions == c).sum(1) for c in range(n_choices)], 1)
    return counts.argmax(1)


# Answer accuracy scores every distinct answer after every rationale: a classification label
# set, not free-form answers such as the arithmetic task's numbers.
MAX_ANSWER_CHOICES = 32


@dataclass
class ReasoningOptions(RewardLMOptions):
    question_key: str = "question"  # the data's question and answer fields
    answer_key: str = "answer"
    prompt_template: str = "{question}"  # the prompt X before the rationale
    answer_template: str = " The answer is {answer}."  # Y, scored after X z STOP
    wrong_answer_log_penalty: float = 0.0  # subtracted from log R(prefix) when the reward LM
    #   finds another choice likelier than the answer after it (the paper's SUBJ: 50)
    eval_data_path: str | None = None  # questions for the answer accuracy (default: the
    #   training questions)

    NON_NEGATIVE = ("wrong_answer_log_penalty",)


class LatentReasoningTask(ContinuationTask):
    name = "reasoning"
    Options = ReasoningOptions
    description = ("sample a latent rationale z in proportion to the posterior "
                   "p(z | X) p(Y | X z) of rationales that explain the known answer Y "
                   "(sections 4.3-4.4)")

    def __init__(
        self,
        tokenizer,
        questions: list[str],
        answers: list[str],
        reward,
        *,
        prompt_template: str = "{question}",
        answer_template: str = " The answer is {answer}.",
        choices: list[str] | None = None,
        wrong_answer_log_penalty: float = 0.0,
        **kwargs,
    ):
        if len(questions) != len(answers):
            raise ValueError(
                f"answers: need one per question ({len(questions)}), got {len(answers)}"
            )
        check_templates(prompt_template, answer_template)
        prompts = [prompt_template.format(question=q) for q in questions]
        super().__init__(tokenizer, prompts, reward, **kwargs)
        self.answers = list(answers)
        self.answer_template = answer_template
        # the answer-accuracy candidates (default: every answer of this data)
        self.choices = sorted(set(self.answers) if choices is None else choices)
        self.answer_texts = [answer_template.format(answer=a) for a in answers]
        self._answer_ids = {}
        self._choice_ids = {}
        if not (wrong_answer_log_penalty >= 0 and wrong_answer_log_penalty < float("inf")):
            raise ValueError(f"wrong_answer_log_penalty: must be finite and >= 0, got "
                             f"{wrong_answer_log_penalty!r}")
        self.wrong_answer_log_penalty = float(wrong_answer_log_penalty)

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.task.data_path:
            raise ConfigError("data_path: the reasoning task needs a .json or .jsonl data file")
        check_templates(cfg.task.prompt_template, cfg.task.answer_template)
        for key in ("data_path", "eval_data_path"):
            path = getattr(cfg.task, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"{key}: no such data file {path!r}")
            if path:  # read now, before any model loads: errors name the file and line
                load_examples(path, cfg.task.question_key, cfg.task.answer_key, key)

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None, choices=None):
        opts = cfg.task
        questions, answers = load_examples(opts.data_path, opts.question_key, opts.answer_key)
        return cls(
            tokenizer,
            questions,
            answers,
            reward,
            prompt_template=cfg.task.prompt_template,
            answer_template=cfg.task.answer_template,
            choices=choices,
            termination=cfg.task.termination,
            use_fused=cfg.objective.use_fused_logprobs,
            illegal_token_bias=cfg.task.illegal_token_bias,
            bias_in_policy=cfg.task.illegal_token_bias_in_policy,
            wrong_answer_log_penalty=cfg.task.wrong_answer_log_penalty,
        )

    def answer_task(self, cfg, tokenizer, reward):
        """The questions scored for answer accuracy (``eval_data_path``, else the training
        questions), or None when the run has no accuracy evaluation. The choices are every
        answer seen in either set, at most ``MAX_ANSWER_CHOICES``."""
        ev = cfg.evaluation
        if ev.eval_rationales <= 0 or ev.eval_samples <= 0:
            return None
        task, answers, path = self, set(self.answers), cfg.task.eval_data_path
        if path:
            answers |= set(load_examples(path, cfg.task.question_key, cfg.task.answer_key)[1])
            task = LatentReasoningTask.from_config(cfg.replace(data_path=path), tokenizer,
                                                   reward, sorted(answers))
            task.set_tool(self.tool())
        if len(answers) > MAX_ANSWER_CHOICES:
            raise ValueError(
                f"eval_rationales: answer accuracy scores every distinct answer and needs at "
                f"most {MAX_ANSWER_CHOICES}, found {len(answers)}; set eval_rationales=0")
        return task

    @torch.no_grad()
    def answer_accuracy(self, engine, cfg, generator) -> dict:
        """On the first ``eval_questions`` questions (0: all). For each, the reward LM scores
        every choice c after a rationale z, ``log p(Y_c | X z STOP)``, and a rationale's
        prediction is its likeliest choice. Four accuracies (the paper's evaluation and two
        more):

        - greedy: the prediction after one rationale decoded greedily from the policy;
        - majority: the most frequent prediction over ``eval_rationales`` rationales sampled
          at temperature 1 (ties go to the choice listed first);
        - mean probability: the choice with the largest mean over those rationales of
          ``p(c | X z) = p(Y_c | X z STOP) / sum_c' p(Y_c' | X z STOP)``;
        - zero-shot: the prediction after the empty rationale (``X STOP Y_c``).

        Questions are split over the ranks, each rank taking the same number (ZeRO-3: the
        same calls), and the counts are summed."""
        from fastgfn.trainer.engines.distributed import rank, world_size
        from fastgfn.trainer.model.loading import eval_mode

        asked = cfg.evaluation.eval_questions
        n = self.num_prompts() if asked <= 0 else min(asked, self.num_prompts())
        per_rank = math.ceil(n / world_size())
        counts = torch.zeros(5, dtype=torch.float64)  # questions, greedy, majority, mean, zero
        with eval_mode(engine.module):
            for j in range(per_rank):
                i = rank() * per_rank + j
                real = i < n
                i = i % n  # padding: a repeat that is not counted
                correct = self._question_predictions(engine, cfg, i, generator)
                if real:
                    counts += torch.tensor([1.0, *correct], dtype=torch.float64)
        if world_size() > 1:
            counts = counts.to(engine.device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        total = max(1.0, float(counts[0]))
        return {
            "answer_questions": int(counts[0]),
            "answer_accuracy_greedy": float(counts[1]) / total,
            "answer_accuracy_majority": float(counts[2]) / total,
            "answer_accuracy": float(counts[3]) / total,
            "zero_shot_accuracy": float(counts[4]) / total,
        }

    def _question_predictions(self, engine, cfg, i: int, generator) -> list[bool]:
        """Whether the greedy, majority, mean-probability and zero-shot predictions of
        question ``i`` are its answer (one scoring call for all rationales)."""
        from fastgfn.trainer.sampling.policy import policy_samples

        choices = self.choices
        with engine.param_context():
            sampled = policy_samples(engine, self, i, cfg.evaluation.eval_rationales,
                                     cfg.sampling, generator).rows()
            greedy = policy_samples(engine, self, i, 1, cfg.sampling, generator,
                                    temperature=0.0).rows()
        ll = self.choice_log_likelihoods(i, sampled + greedy + [[]], choices)  # [R + 2, C]
        preds = [
            int(ll[len(sampled)].argmax()),  # greedy
            int(majority_vote(ll[: len(sampled)].argmax(1)[None], len(choices))[0]),  # majority
            int(ll[: len(sampled)].log_softmax(1).exp().mean(0).argmax()),  # mean probability
            int(ll[-1].argmax()),  # zero-shot
        ]
        return [choices[p] == self.answers[i] for p in preds]

    def reward_prompt_tokens(self, index: int) -> torch.Tensor:
        """The context X the reward LM scores the rationale and the answer after: the
        policy's prompt here; a subclass may give the reward LM other text (the infilling
        task's policy sees a template with the ending, its reward LM only the beginning; the
        arithmetic task's reward LM reads few-shot examples before the question)."""
        return self.prompt_tokens(index)

    def answer_tokens(self, index: int) -> torch.Tensor:
        """Token ids of the answer text Y of question ``index`` (at least one)."""
        if index not in self._answer_ids:
            self._answer_ids[index] = self._encode_answer(self.answer_texts[index],
                                                          f"answer of item {index}")
        return self._answer_ids[index]

    def choice_tokens(self, choices: list[str]) -> list[torch.Tensor]:
        """Token ids of the answer text ``Y_c`` of each choice c (at least one each)."""
        for c in choices:
            if c not in self._choice_ids:
                self._choice_ids[c] = self._encode_answer(
                    self.answer_template.format(answer=c), "choices")
        return [self._choice_ids[c] for c in choices]

    def _encode_answer(self, text: str, what: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"answer_template: the {what} has no tokens ({text!r})")
        return torch.tensor(ids)

    @torch.no_grad()
    def answer_log_likelihood(self, prompt_index: int, rows: list[list[int]], T: int):
        """``[len(rows), T + 1]`` float32: entry ``[b, t]`` is ``log p_LM(Y | X z_1..z_t
        STOP)`` for the first t tokens of ``rows[b]``; 0 past a row's length."""
        return self._scores(prompt_index, rows, T, with_rationale=False)

    @torch.no_grad()
    def log_rewards(self, prompt_index: int, rows: list[list[int]], T: int) -> torch.Tensor:
        """``log p_LM(z_1..z_t STOP | X) + log p_LM(Y | X z_1..z_t STOP)``, ``[len(rows), T+1]``
        (not divided by the reward temperature; entries past a row's length are masked by the
        loss). One pass over the rationales serves both terms."""
        return self._scores(prompt_index, rows, T, with_rationale=True)

    @torch.no_grad()
    def state_log_rewards(self, prompt_index: int, rows: list[list[int]], T: int,
                          states: torch.Tensor | None = None) -> torch.Tensor:
        """``log_rewards`` at the states only (rows with tool tokens): the answer term runs
        for the prefixes that are states, not for every token prefix."""
        if states is None:
            return self.log_rewards(prompt_index, rows, T)
        states = states.cpu()
        prefixes = [sorted(set(s)) for s in states.tolist()]
        return self._scores(prompt_index, rows, T, True, prefixes).gather(1, states)

    def _scores(self, prompt_index, rows, T, with_rationale: bool, prefixes=None):
        """``[len(rows), T + 1]``: the scores of every prefix of every row, or with
        ``prefixes`` (per row, prefix lengths) the answer term only at those (0 elsewhere)."""
        self._check_rows(prompt_index, rows, T)
        if prefixes is None:
            prefixes = [range(len(row) + 1) for row in rows]
        pairs = [(b, t) for b in range(len(rows)) for t in prefixes[b]]
        penalise = with_rationale and self.wrong_answer_log_penalty > 0
        if penalise:  # every choice after every prefix; the answer's is the answer term
            right = self.choices.index(self.answers[prompt_index])
            options = self.choice_tokens(self.choices)
        else:
            options = [self.answer_tokens(prompt_index)]
        out = torch.zeros(len(rows), T + 1)
        prefix, ll = self._score(prompt_index, rows, T,
                                 ([p for p in pairs for _ in options], options * len(pairs)),
                                 with_prefix=with_rationale)
        if with_rationale:
            out += prefix
        ll = ll.view(len(pairs), len(options))
        if penalise:  # another choice strictly likelier than the answer: the paper's penalty
            others = torch.cat([ll[:, :right], ll[:, right + 1:]], 1)
            wrong = others.max(1).values > ll[:, right]
            ll = ll[:, right] - self.wrong_answer_log_penalty * wrong.float()
        else:
            ll = ll[:, 0]
        out[torch.tensor([b for b, _ in pairs]), torch.tensor([t for _, t in pairs])] += ll
        return out

    @torch.no_grad()
    def choice_log_likelihoods(self, prompt_index: int, rows: list[list[int]],
                               choices: list[str]) -> torch.Tensor:
        """``[len(rows), len(choices)]`` float32: ``log p_LM(Y_c | X z STOP)`` after each whole
        rationale ``rows[b]``, ``Y_c`` the answer template filled with choice c."""
        T = max((len(r) for r in rows), default=0)
        self._check_rows(prompt_index, rows, T)
        ids = self.choice_tokens(choices)
        pairs = [(b, len(row)) for b, row in enumerate(rows) for _ in choices]
        _, ll = self._score(prompt_index, rows, T, (pairs, ids * len(rows)), with_prefix=False)
        return ll.view(len(rows), len(choices))

    def _score(self, prompt_index, rows, T, answers, with_prefix: bool):
        """The frozen reward LM's ``score`` of X ``rows``: the prefix rewards (with
        ``with_prefix``, the illegal tokens biased) and the answer terms of ``answers``."""
        return self.reward.score(self.reward_prompt_tokens(prompt_index),
                                 self._padded_rows(rows, T), self.termination_token_id,
                                 T=T if with_prefix else None,
                                 prefix_bias=self.vocab_bias() if with_prefix else None,
                                 answers=answers, pad_token_id=self.pad_token_id,
                                 fused=self.use_fused)
