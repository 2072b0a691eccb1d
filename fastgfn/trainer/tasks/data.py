"""Reading the tasks' data files, in one place: prompts (one a line), JSON and JSON-lines
items, questions with their answers, story rows from CSV or JSON, and the seeded held-out
split. Every error is a ``ConfigError`` (or ``FileNotFoundError``) that names the config key,
the file and, for JSON, the line."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from fastgfn.trainer.errors import ConfigError


def read_prompts(path) -> list[str]:
    """The non-empty lines of a prompts file (a ``ConfigError`` naming it if unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data_path: cannot read the prompts file {str(path)!r} ({exc})"
                          ) from None
    return [x.strip() for x in text.splitlines() if x.strip()]


def read_items(path: Path, key: str):
    """The JSON value of a ``.json`` file, or the list of one value per line of a ``.jsonl``
    file; a ``ConfigError`` naming ``key``, the file and the line when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {str(path)!r} ({exc})") from None
    lines = enumerate(text.splitlines(), 1) if path.suffix == ".jsonl" else [(1, text)]
    items = []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: {str(path)!r} line {n + exc.lineno - 1}, column "
                              f"{exc.colno}: invalid JSON ({exc.msg})") from None
        if path.suffix != ".jsonl":
            return item
        items.append(item)
    return items


def load_examples(path: str | Path, question_key: str, answer_key: str,
                  key: str = "data_path"):
    """``(questions, answers)`` as strings from a ``.json`` list or a ``.jsonl`` file; a
    ``ConfigError`` naming ``key``, the file and the line for anything it cannot use."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such data file {str(path)!r}")
    items = read_items(path, key)
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ConfigError(f"{key}: {str(path)!r} must hold a list of objects (or JSON lines)")
    if not items:
        raise ConfigError(f"{key}: {str(path)!r} holds no examples")
    for k, name in ((question_key, "question_key"), (answer_key, "answer_key")):
        missing = [i for i, x in enumerate(items) if k not in x]
        if missing:
            raise ConfigError(
                f"{name}: field {k!r} is missing from item {missing[0]} of {str(path)!r}"
            )
    return [str(x[question_key]) for x in items], [str(x[answer_key]) for x in items]


def read_rows(path: Path, key: str) -> list[dict]:
    """The rows of a ``.csv`` file with a header, or the objects of a ``.jsonl`` / ``.json``
    file."""
    if path.suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{key}: cannot read {str(path)!r} ({exc})") from None
        return rows
    if path.suffix in (".jsonl", ".json"):
        items = read_items(path, key)
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise ConfigError(f"{key}: {str(path)!r} must hold a list of objects (or JSON lines)")
        return items
    raise ConfigError(f"{key}: {str(path)!r} must be a .csv, .jsonl or .json file of stories")


def split_prompts(prompts: list[str], fraction: float, seed: int = 0):
    """``(train, heldout)``: ``round(fraction * len(prompts))`` prompts held out, the rest for
    training, each list in file order. The held-out ones are a random subset drawn with
    ``random.Random(seed)`` (the same on every machine and Python version); a negative
    ``seed`` holds out the last prompts of the file, as the paper's code does."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {fraction!r}")
    n = len(prompts)
    k = round(fraction * n)
    if k >= n > 0:
        raise ValueError(
            f"heldout_fraction: {fraction} holds out all {n} prompts; nothing is left to train on"
        )
    if seed < 0:
        held = set(range(n - k, n))
    else:
        held = set(random.Random(seed).sample(range(n), k))
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [p for i, p in enumerate(prompts) if i in held]
