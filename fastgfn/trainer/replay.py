"""Replay buffer: per prompt, the top-K distinct sequences by log-reward.

A new sequence enters when it is not already stored and beats the worst stored one (or there
is room). With ``min_distance > 0`` a sequence within that token edit distance of a stored one
is a near-duplicate: it replaces the stored one only when its log-reward is higher. The
buffer serialises to JSON (``state_dict`` / ``load_state_dict``), never pickle; a state read
back is checked field by field (``check_state``). A non-finite log-reward never enters.
"""

from __future__ import annotations

import math
import random

import torch


def edit_distance(a: list[int], b: list[int], cap: int | None = None) -> int:
    """Levenshtein distance between token lists (early exit once every entry exceeds cap)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        if cap is not None and min(cur) > cap:
            return cap + 1
        prev = cur
    return prev[-1]


class ReplayBuffer:
    def __init__(self, capacity: int, min_distance: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.min_distance = min_distance
        self.entries: dict[int, list[tuple[float, list[int]]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def size(self, prompt: int) -> int:
        return len(self.entries.get(prompt, []))

    def add(self, prompt: int, tokens: list[int], log_reward: float) -> bool:
        """Offer one sequence; return whether the buffer changed (never for a non-finite
        log-reward)."""
        log_reward = float(log_reward)
        if not math.isfinite(log_reward):
            return False
        items = self.entries.setdefault(int(prompt), [])
        tokens = [int(t) for t in tokens]
        for k, (lr, seq) in enumerate(items):
            if seq == tokens:
                return False
            if (
                self.min_distance > 0
                and edit_distance(seq, tokens, self.min_distance) <= self.min_distance
            ):
                if log_reward > lr:
                    items[k] = (log_reward, tokens)
                    items.sort(key=lambda e: -e[0])
                    return True
                return False
        if len(items) >= self.capacity:
            if log_reward <= items[-1][0]:
                return False
            items.pop()
        items.append((log_reward, tokens))
        items.sort(key=lambda e: -e[0])
        return True

    def add_batch(self, prompt: int, rows: list[list[int]], log_rewards) -> int:
        return sum(self.add(prompt, r, float(lr)) for r, lr in zip(rows, log_rewards))

    def sample(self, prompt: int, n: int, rng: random.Random) -> list[list[int]]:
        items = self.entries.get(int(prompt), [])
        if not items:
            raise ValueError(f"replay buffer holds nothing for prompt {prompt}")
        return [list(items[rng.randrange(len(items))][1]) for _ in range(n)]

    @staticmethod
    def to_tensors(rows: list[list[int]], pad_token_id: int = 0):
        """(tokens [B, T], lengths [B]) with right padding (T >= 1)."""
        T = max(1, max((len(r) for r in rows), default=1))
        tokens = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return tokens, torch.tensor([len(r) for r in rows], dtype=torch.long)

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "min_distance": self.min_distance,
            "entries": {str(p): [[lr, seq] for lr, seq in v] for p, v in self.entries.items()},
        }

    def load_state_dict(self, state: dict, vocab_size: int | None = None,
                        num_prompts: int | None = None) -> None:
        """Restore ``state_dict()``'s output after ``check_state`` (a ValueError naming the
        field that is wrong)."""
        check_state(state, vocab_size, num_prompts)
        self.capacity = int(state["capacity"])
        self.min_distance = int(state["min_distance"])
        self.entries = {
            int(p): [(float(lr), [int(t) for t in seq]) for lr, seq in v]
            for p, v in state["entries"].items()
        }

    def resize(self, capacity: int) -> None:
        """A new capacity; a smaller one keeps each prompt's best ``capacity`` sequences."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries = {p: v[:capacity] for p, v in self.entries.items()}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_state(state, vocab_size: int | None = None, num_prompts: int | None = None) -> None:
    """A replay buffer state (as JSON gives it back): ``capacity`` an int > 0, ``min_distance``
    an int >= 0, ``entries`` a mapping from prompt index (< ``num_prompts``) to at most
    ``capacity`` pairs [finite log-reward, token ids in [0, ``vocab_size``)]. Raises a
    ValueError naming the first field that is wrong."""
    if not isinstance(state, dict):
        raise ValueError(f"buffer: expected an object, got {type(state).__name__}")
    for key in ("capacity", "min_distance", "entries"):
        if key not in state:
            raise ValueError(f"buffer.{key}: missing")
    cap = state["capacity"]
    if not (_is_int(cap) and cap > 0):
        raise ValueError(f"buffer.capacity: must be an integer > 0, got {cap!r}")
    if not (_is_int(state["min_distance"]) and state["min_distance"] >= 0):
        raise ValueError(f"buffer.min_distance: must be an integer >= 0, got "
                         f"{state['min_distance']!r}")
    if not isinstance(state["entries"], dict):
        raise ValueError("buffer.entries: expected an object of prompt index -> entries")
    for p, items in state["entries"].items():
        _check_prompt_entries(p, items, cap, vocab_size, num_prompts)


def _check_prompt_entries(p, items, cap, vocab_size, num_prompts) -> None:
    where = f"buffer.entries[{p!r}]"
    if not (isinstance(p, str) and p.isdigit()) or \
            (num_prompts is not None and int(p) >= num_prompts):
        raise ValueError(f"{where}: prompt index must be an integer in [0, {num_prompts}), "
                         f"got {p!r}")
    if not isinstance(items, list) or len(items) > cap:
        raise ValueError(f"{where}: expected a list of at most {cap} entries")
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            raise ValueError(f"{where}[{i}]: expected [log_reward, [token ids]]")
        lr, seq = item
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"{where}[{i}]: log-reward must be a finite number, got {lr!r}")
        for t in seq:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"{where}[{i}]: token id {t!r} is not in the vocabulary "
                                 f"[0, {vocab_size})")
