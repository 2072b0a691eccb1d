"""Story infilling (Hu et al. 2024, section 4.2).

A story is a list of sentences; one of them, the middle z, is missing. Given the beginning X
(the sentences before it) and the ending Y (the sentences after it), the policy samples z;
the target is the posterior under the frozen reward LM,

    p(z | X, Y)  proportional to  p_LM(X z Y) / p_LM(X)  =  p_LM(z | X) p_LM(Y | X z),

and modified SubTB scores every prefix of z as a finished middle:

    log R(z_1..z_t STOP) = log p_LM(z_1..z_t STOP | X) + log p_LM(Y | X z_1..z_t STOP).

This is the latent-rationale reward of ``reasoning.py`` (one pass over the middles gives
both terms, the ending from the KV cache), so the task is a ``LatentReasoningTask`` with two
differences:

- **The policy's prompt is not the reward's context.** The policy must know the ending to
  aim for it, so it sees ``prompt_template`` filled with both, by default
  ``"Beginning: {beginning}\\nEnding: {ending}\\nMiddle:"`` (the paper's code); the reward LM
  sees the story text alone, X = the beginning's sentences joined by spaces (the paper's
  "reward without prompt").
- **STOP is the middle sentence's full stop.** The termination token is ``"."``: a middle
  " She called her neighbor who kept a spare one" followed by STOP is the text
  " She called her neighbor who kept a spare one." The ending Y is the following sentences
  with a leading space (" Maria thanked him and finally went inside."), so X z STOP Y reads
  as the whole story. A reference middle that ends with other punctuation ("!", "?") has it
  replaced by the termination for the SFT targets and left out for the metrics.

Data: a ``.csv`` file with a header, or ``.jsonl`` (one object a line) / ``.json`` (a list of
objects). ``story_columns`` names the sentence columns in story order (ROCStories:
``sentence1,...,sentence5``) and ``infill_column`` the missing one (the paper: ``sentence4``,
so X is sentences 1-3 and Y sentence 5); it may be neither the first nor the last. Rows are
split into training and held-out stories by ``heldout_fraction`` / ``heldout_seed`` as the
continuation prompts are (``data.split_prompts``); training sees only its part and
``python -m fastgfn.trainer.evaluation.infilling`` evaluates on the held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.tasks.data import read_rows, split_prompts
from fastgfn.trainer.tasks.options import RewardLMOptions, check_heldout_fraction
from fastgfn.trainer.tasks.reasoning import LatentReasoningTask

DEFAULT_PROMPT = "Beginning: {beginning}\nEnding: {ending}\nMiddle:"
_END_PUNCTUATION = ".!?"


@dataclass
class InfillingOptions(RewardLMOptions):
    story_columns: list[str] = field(default_factory=lambda: [
        f"sentence{i}" for i in range(1, 6)])  # the story's sentence columns in order
    #   (ROCStories' sentence1..sentence5; a comma list or a YAML list)
    infill_column: str = "sentence4"  # the missing middle; before it X, after it Y
    prompt_template: str = DEFAULT_PROMPT  # the policy's prompt from {beginning} and {ending}
    heldout_fraction: float = 0.05  # stories held out of training, for
    #   `python -m fastgfn.trainer.evaluation.infilling`
    heldout_seed: int = 0  # the split's own seed (not `seed`)

    def check(self) -> None:
        super().check()
        check_heldout_fraction(self.heldout_fraction)


@dataclass(frozen=True)
class Story:
    beginning: str  # X: the sentences before the middle, joined by spaces
    middle: str  # the reference z, as written
    ending: str  # the sentences after it, joined by spaces (no leading space)


def parse_columns(value) -> list[str]:
    """``story_columns``: a comma-separated string or a list of column names."""
    cols = value.split(",") if isinstance(value, str) else list(value or [])
    cols = [str(c).strip() for c in cols]
    if len(cols) < 3 or not all(cols) or len(set(cols)) != len(cols):
        raise ConfigError(f"story_columns: need at least 3 distinct column names (beginning, "
                          f"middle, ending), got {value!r}")
    return cols


def read_stories(path, columns, infill_column: str, key: str = "data_path") -> list[Story]:
    """The stories of a CSV/JSONL/JSON file, split around ``infill_column``; a ``ConfigError``
    naming the key, the file, the row and the column for anything unusable."""
    path, columns = Path(path), parse_columns(columns)
    if infill_column not in columns[1:-1]:
        raise ConfigError(f"infill_column: must be one of story_columns other than the first "
                          f"and the last ({', '.join(columns[1:-1])}), got {infill_column!r}")
    if not path.is_file():
        raise ConfigError(f"{key}: no such story file {str(path)!r}")
    rows = read_rows(path, key)
    if not rows:
        raise ConfigError(f"{key}: {str(path)!r} holds no stories")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ConfigError(f"story_columns: column {missing[0]!r} is not in {str(path)!r} "
                          f"(it has {', '.join(map(str, rows[0]))})")
    m = columns.index(infill_column)
    stories = []
    for n, row in enumerate(rows, 1):
        cells = []
        for c in columns:
            text = row.get(c)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{key}: {str(path)!r} story {n}: column {c!r} is empty "
                                  "or not text")
            cells.append(" ".join(text.split()))
        stories.append(Story(" ".join(cells[:m]), cells[m], " ".join(cells[m + 1:])))
    return stories


def split_stories(stories: list[Story], fraction: float, seed: int):
    """``(train, heldout)`` as ``continuation.split_prompts`` splits prompts."""
    train, held = split_prompts(list(range(len(stories))), fraction, seed)
    return [stories[i] for i in train], [stories[i] for i in held]


def check_prompt_template(template: str) -> None:
    if "{beginning}" not in template:
        raise ConfigError(f"prompt_template: the infilling task needs {{beginning}} (and "
                          f"usually {{ending}}) in it, got {template!r}")
    try:
        template.format(beginning="", ending="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"prompt_template: only {{beginning}} and {{ending}} may be "
                          f"filled in, got {template!r} ({exc!r})") from None


def config_stories(cfg, heldout: bool = False) -> list[Story]:
    """The training stories of ``cfg`` (or, with ``heldout``, the held-out ones)."""
    stories = read_stories(cfg.task.data_path, cfg.task.story_columns, cfg.task.infill_column)
    try:
        train, held = split_stories(stories, cfg.task.heldout_fraction, cfg.task.heldout_seed)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({cfg.task.data_path!r})") from None
    return held if heldout else train


def reference_middle(story: Story, termination: str = ".") -> str:
    """The reference middle without its final punctuation (what the policy writes before
    STOP), with its leading space: " She called her neighbor who kept a spare one"."""
    marks = _END_PUNCTUATION + (termination if len(termination) == 1 else "")
    return " " + story.middle.rstrip().rstrip(marks).rstrip()


def infill_prompt(story: Story, template: str = DEFAULT_PROMPT) -> str:
    return template.format(beginning=story.beginning, ending=story.ending)


def sft_pairs(cfg, tokenizer=None) -> list[tuple[str, str, None]]:
    """The SFT baseline's training data: ``(policy prompt, reference middle + termination,
    no loss mask)`` for each training story of ``cfg`` (``baselines/sft.py``)."""
    return [(infill_prompt(s, cfg.task.prompt_template), reference_middle(s, cfg.task.termination)
             + cfg.task.termination, None) for s in config_stories(cfg)]


class StoryInfillingTask(LatentReasoningTask):
    name = "infilling"
    Options = InfillingOptions
    description = ("fill in the missing middle sentence z of a story given its beginning X and "
                   "ending Y, sampled in proportion to p(z | X) p(Y | X z) under the frozen "
                   "reward LM (section 4.2)")

    def __init__(self, tokenizer, stories: list[Story], reward, *,
                 prompt_template: str = DEFAULT_PROMPT, **kwargs):
        if not stories:
            raise ValueError("data_path: no stories to train on")
        check_prompt_template(prompt_template)
        super().__init__(tokenizer, [infill_prompt(s, prompt_template) for s in stories],
                         [" " + s.ending for s in stories], reward,
                         answer_template="{answer}", **kwargs)
        self.stories = list(stories)
        self._context_ids = {}

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.task.data_path:
            raise ConfigError("data_path: the infilling task needs a .csv or .jsonl story file")
        check_prompt_template(cfg.task.prompt_template)
        config_stories(cfg)  # read now, before any model loads: errors name the file and row

    def answer_task(self, cfg, tokenizer, reward):
        return None  # its answers (the endings) are free text, not a label set

    @classmethod
    def sft_pairs(cls, cfg, tokenizer):
        return sft_pairs(cfg, tokenizer)

    @classmethod
    def from_config(cls, cfg, tokenizer, reward=None, choices=None):
        return cls(tokenizer, config_stories(cfg), reward, prompt_template=cfg.task.prompt_template,
                   termination=cfg.task.termination, use_fused=cfg.objective.use_fused_logprobs,
                   illegal_token_bias=cfg.task.illegal_token_bias)

    def reward_prompt_tokens(self, index: int) -> torch.Tensor:
        """X, the story's beginning as plain text (the reward LM never sees the template)."""
        if index not in self._context_ids:
            self._context_ids[index] = torch.tensor(self.tokenizer.encode(
                self.stories[index].beginning, add_special_tokens=False))
        return self._context_ids[index]

    def reference(self, index: int) -> str:
        return reference_middle(self.stories[index], self.termination)
