"""Replay buffer: per prompt, the top-K distinct sequences by log-reward.

A new sequence enters when it is not already stored and beats the worst stored one (or there
is room). A near-duplicate of a stored sequence replaces it only when its log-reward is
higher: near means within ``min_distance`` token edits, or (``relative_distance`` > 0, the
paper's 0.25) fewer edits than ``relative_distance`` times the two sequences' summed
lengths. The buffer serialises to JSON (``state_dict`` / ``load_state_dict``), never pickle.
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
    def __init__(self, capacity: int, min_distance: int = 0, relative_distance: float = 0.0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0.0 <= relative_distance <= 1.0:
            raise ValueError(f"relative_distance must lie in [0, 1], got {relative_distance}")
        self.capacity = capacity
        self.min_distance = min_distance
        self.relative_distance = float(relative_distance)
        self.entries: dict[int, list[tuple[float, list[int]]]] = {}

    def near(self, a: list[int], b: list[int]) -> bool:
        """Whether ``a`` and ``b`` are near-duplicates (the thresholds above)."""
        if self.min_distance > 0 and edit_distance(a, b, self.min_distance) <= self.min_distance:
            return True
        if self.relative_distance > 0:
            limit = self.relative_distance * (len(a) + len(b))
            return edit_distance(a, b, math.ceil(limit)) < limit
        return False

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def size(self, prompt: int) -> int:
        return len(self.entries.get(prompt, []))

    def add(self, prompt: int, tokens: list[int], log_reward: float) -> bool:
        """Offer one sequence; return whether the buffer changed."""
        items = self.entries.setdefault(int(prompt), [])
        tokens = [int(t) for t in tokens]
        log_reward = float(log_reward)
        for k, (lr, seq) in enumerate(items):
            if seq == tokens:
                return False
            if self.near(seq, tokens):
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
            "relative_distance": self.relative_distance,
            "entries": {str(p): [[lr, seq] for lr, seq in v] for p, v in self.entries.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.min_distance = int(state["min_distance"])
        self.relative_distance = float(state.get("relative_distance", 0.0))
        self.entries = {
            int(p): [(float(lr), [int(t) for t in seq]) for lr, seq in v]
            for p, v in state["entries"].items()
        }
