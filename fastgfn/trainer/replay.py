"""Replay buffer: per prompt, the top-K distinct sequences by log-reward.

A new sequence enters when it is not already stored and beats the worst stored one (or there
is room). A near-duplicate of a stored sequence replaces it only when its log-reward is
higher: near means within ``min_distance`` token edits, or (``relative_distance`` > 0, the
paper's 0.25) fewer edits than ``relative_distance`` times the two sequences' summed
lengths. ``sampling`` picks how a prompt's rows are drawn: ``uniform``, or ``reward`` (the
paper's prioritised replay: row i with probability ``exp(log R_i) / sum_j exp(log R_j)``,
untempered, so a worked rationale at -6 nats is drawn e^24 times as often as a collapsed one
at -30). The buffer serialises to JSON (``state_dict`` / ``load_state_dict``), never pickle;
a state read back is checked field by field (``check_state``). A non-finite log-reward never
enters.

Rows sampled with a tool mix actions and tool tokens: such a row is stored with its action
mask (``add(..., action_mask=...)``; ``sample_with_masks`` gives it back), in JSON as a third
field of its entry, a list of 1 (action) and 0 (tool token). An entry without one is all
actions, so buffers saved before masks existed load unchanged.
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


SAMPLINGS = ("uniform", "reward")


class ReplayBuffer:
    def __init__(self, capacity: int, min_distance: int = 0, relative_distance: float = 0.0,
                 sampling: str = "uniform"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0.0 <= relative_distance <= 1.0:
            raise ValueError(f"relative_distance must lie in [0, 1], got {relative_distance}")
        self.capacity = capacity
        self.min_distance = min_distance
        self.relative_distance = float(relative_distance)
        self.entries: dict[int, list[tuple[float, list[int]]]] = {}
        # per prompt, the action masks of the stored sequences that have tool tokens
        self.masks: dict[int, dict[tuple[int, ...], list[bool]]] = {}

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

    def add(self, prompt: int, tokens: list[int], log_reward: float,
            action_mask: list[bool] | None = None) -> bool:
        """Offer one sequence (with its action mask when it has tool tokens); return whether
        the buffer changed (never for a non-finite log-reward)."""
        log_reward = float(log_reward)
        if not math.isfinite(log_reward):
            return False
        prompt = int(prompt)
        items = self.entries.setdefault(prompt, [])
        tokens = [int(t) for t in tokens]
        mask = _normal_mask(action_mask, len(tokens))
        for k, (lr, seq) in enumerate(items):
            if seq == tokens:
                return False
            if self.near(seq, tokens):
                if log_reward > lr:
                    self._forget(prompt, seq)
                    items[k] = (log_reward, tokens)
                    self._remember(prompt, tokens, mask)
                    items.sort(key=lambda e: -e[0])
                    return True
                return False
        if len(items) >= self.capacity:
            if log_reward <= items[-1][0]:
                return False
            self._forget(prompt, items.pop()[1])
        items.append((log_reward, tokens))
        self._remember(prompt, tokens, mask)
        items.sort(key=lambda e: -e[0])
        return True

    def _remember(self, prompt: int, seq: list[int], mask: list[bool] | None) -> None:
        if mask is not None:
            self.masks.setdefault(prompt, {})[tuple(seq)] = mask

    def _forget(self, prompt: int, seq: list[int]) -> None:
        self.masks.get(prompt, {}).pop(tuple(seq), None)

    def mask(self, prompt: int, seq: list[int]) -> list[bool] | None:
        """The action mask of a stored sequence (None: every token is an action)."""
        return self.masks.get(int(prompt), {}).get(tuple(seq))

    def add_batch(self, prompt: int, rows: list[list[int]], log_rewards,
                  masks: list[list[bool]] | None = None) -> int:
        masks = masks if masks is not None else [None] * len(rows)
        return sum(self.add(prompt, r, float(lr), m)
                   for r, lr, m in zip(rows, log_rewards, masks))

    def sample(self, prompt: int, n: int, rng: random.Random) -> list[list[int]]:
        items = self.entries.get(int(prompt), [])
        if not items:
            raise ValueError(f"replay buffer holds nothing for prompt {prompt}")
        if self.sampling == "reward":
            top = items[0][0]  # entries are sorted by log-reward, best first
            weights = [math.exp(lr - top) for lr, _ in items]
            return [list(seq) for _, seq in rng.choices(items, weights=weights, k=n)]
        return [list(items[rng.randrange(len(items))][1]) for _ in range(n)]

    def sample_with_masks(self, prompt: int, n: int, rng: random.Random):
        """``(rows, masks)``: ``sample``'s draws (the same random numbers) and each row's
        action mask, all True for a row without tool tokens."""
        rows = self.sample(prompt, n, rng)
        masks = [self.mask(prompt, r) or [True] * len(r) for r in rows]
        return rows, masks

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
            "entries": {str(p): [self._entry(p, lr, seq) for lr, seq in v]
                        for p, v in self.entries.items()},
        }

    def _entry(self, prompt: int, lr: float, seq: list[int]) -> list:
        mask = self.mask(prompt, seq)
        return [lr, seq] if mask is None else [lr, seq, [int(m) for m in mask]]

    def load_state_dict(self, state: dict, vocab_size: int | None = None,
                        num_prompts: int | None = None) -> None:
        """Restore ``state_dict()``'s output after ``check_state`` (a ValueError naming the
        field that is wrong)."""
        check_state(state, vocab_size, num_prompts)
        self.capacity = int(state["capacity"])
        self.min_distance = int(state["min_distance"])
        self.relative_distance = float(state.get("relative_distance", 0.0))
        self.entries = {
            int(p): [(float(e[0]), [int(t) for t in e[1]]) for e in v]
            for p, v in state["entries"].items()
        }
        self.masks = {}
        for p, v in state["entries"].items():
            for e in v:
                self._remember(int(p), e[1], _normal_mask(e[2] if len(e) > 2 else None,
                                                          len(e[1])))

    def resize(self, capacity: int) -> None:
        """A new capacity; a smaller one keeps each prompt's best ``capacity`` sequences."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        for p, v in self.entries.items():
            for _, seq in v[capacity:]:
                self._forget(p, seq)
        self.entries = {p: v[:capacity] for p, v in self.entries.items()}


def _normal_mask(mask, n: int) -> list[bool] | None:
    """An action mask as a list of bools of length ``n``; None when absent or all True."""
    if mask is None:
        return None
    mask = [bool(m) for m in mask]
    if len(mask) != n:
        raise ValueError(f"action_mask: needs one entry per token ({n}), got {len(mask)}")
    return None if all(mask) else mask


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_state(state, vocab_size: int | None = None, num_prompts: int | None = None) -> None:
    """A replay buffer state (as JSON gives it back): ``capacity`` an int > 0, ``min_distance``
    an int >= 0, ``entries`` a mapping from prompt index (< ``num_prompts``) to at most
    ``capacity`` pairs [finite log-reward, token ids in [0, ``vocab_size``)], optionally with
    a third field, the action mask (0/1 per token). Raises a
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
    rel = state.get("relative_distance", 0.0)
    if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not 0.0 <= rel <= 1.0:
        raise ValueError(f"buffer.relative_distance: must be a number in [0, 1], got {rel!r}")
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
        if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[1], list)):
            raise ValueError(f"{where}[{i}]: expected [log_reward, [token ids]] or "
                             "[log_reward, [token ids], [action mask]]")
        lr, seq = item[:2]
        if len(item) == 3 and not (isinstance(item[2], list) and len(item[2]) == len(seq)
                                   and all(_is_int(m) and m in (0, 1) for m in item[2])):
            raise ValueError(f"{where}[{i}]: the action mask must be a list of 0/1, one per "
                             f"token ({len(seq)})")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"{where}[{i}]: log-reward must be a finite number, got {lr!r}")
        for t in seq:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"{where}[{i}]: token id {t!r} is not in the vocabulary "
                                 f"[0, {vocab_size})")
