"""Replay buffer: per prompt, the top-K distinct sequences by log-reward.

A new sequence enters when it is not already stored and beats the worst stored one (or there
is room). With ``min_distance > 0`` a sequence within that token edit distance of a stored one
is a near-duplicate: it replaces the stored one only when its log-reward is higher. The
buffer serialises to JSON (``state_dict`` / ``load_state_dict``), never pickle.
"""

from __future__ import annotations

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
        """Offer one sequence; return whether the buffer changed."""
        items = self.entries.setdefault(int(prompt), [])
        tokens = [int(t) for t in tokens]
        log_reward = float(log_reward)
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

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.min_distance = int(state["min_distance"])
        self.entries = {
            int(p): [(float(lr), [int(t) for t in seq]) for lr, seq in v]
            for p, v in state["entries"].items()
        }
