"""The growing rows of one rollout, and the tool results waiting to be fed to them.

``Rows`` holds what the sampler has produced so far: per row its tokens (actions and tool
tokens), which of them are actions, how many tokens and actions it has, and whether it is
finished (it drew the termination token, or it used its ``max_new_tokens`` actions and has
no tool tokens left to receive). All running rows grow by exactly one token per decoding
step, so column ``t`` holds every running row's token of step ``t``.

``ToolFeed`` keeps, per row, the tool's result tokens not yet fed: after a row's action is one
of the tool's triggers, the tool runs on the row's tokens so far (on the host) and its result
is queued; each following step feeds the row the next queued token instead of its draw
(``fastgfn.trainer.tools``).
"""

from __future__ import annotations

import torch


class Rows:
    def __init__(self, batch_size: int, width: int, pad_token_id: int, device,
                 with_mask: bool):
        B = batch_size
        self.pad = pad_token_id
        self.tokens = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
        self.action = torch.ones((B, width), dtype=torch.bool, device=device) if with_mask \
            else None
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.actions = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(B, dtype=torch.bool, device=device)

    def append(self, t: int, nxt: torch.Tensor, stop_id: int,
               forced: torch.Tensor | None = None) -> torch.Tensor:
        """Step ``t``: each running row takes ``nxt`` (the termination token ends it, unless
        the token is a forced tool token). Returns the rows whose token is an action."""
        stop = (nxt == stop_id) & ~self.done
        if forced is not None:
            stop &= ~forced
        keep = ~self.done & ~stop
        self.tokens[:, t] = torch.where(keep, nxt, torch.full_like(nxt, self.pad))
        self.lengths += keep.long()
        acted = keep if forced is None else keep & ~forced
        self.actions += acted.long()
        if self.action is not None and forced is not None:
            self.action[:, t] = ~forced
        self.stopped |= stop
        self.done |= stop
        return acted

    def finish_full(self, max_actions: int, pending: torch.Tensor | None = None) -> None:
        """Rows that used their ``max_actions`` actions (and have no tool tokens pending)."""
        full = self.actions >= max_actions
        if pending is not None:
            full &= ~pending
        self.done |= full

    def forbid_stop(self, t: int, min_actions: int):
        """Where termination is forbidden (fewer than ``min_actions`` actions): None (nowhere),
        True (every row) or a ``[B]`` mask when rows differ (tool tokens)."""
        if self.action is None:
            return True if t < min_actions else None
        if min_actions == 0:
            return None
        return self.actions < min_actions


class ToolFeed:
    def __init__(self, tool, batch_size: int, device):
        self.tool = tool
        self.device = device
        self.queues: list[list[int]] = [[] for _ in range(batch_size)]
        self.triggers = torch.tensor(sorted(tool.trigger_ids), dtype=torch.long, device=device)
        self.calls = 0  # trigger actions seen
        self.results = 0  # of them, calls that gave a result

    def take(self, nxt: torch.Tensor):
        """``(tokens, forced)``: rows with queued tool tokens get the next one instead of
        their draw ``nxt``; ``forced`` marks them."""
        forced = [bool(q) for q in self.queues]
        if not any(forced):
            return nxt, torch.zeros_like(nxt, dtype=torch.bool)
        values = [q.pop(0) if q else 0 for q in self.queues]
        mask = torch.tensor(forced, device=self.device)
        return torch.where(mask, torch.tensor(values, device=self.device), nxt), mask

    def offer(self, tokens: torch.Tensor, t: int, acted: torch.Tensor, nxt: torch.Tensor):
        """Rows whose action at column ``t`` is a trigger: run the tool on their tokens so far
        and queue its result (none: nothing queued)."""
        hit = acted & torch.isin(nxt, self.triggers)
        if not bool(hit.any()):
            return
        for b in hit.nonzero().flatten().tolist():
            result = self.tool.call(tokens[b, : t + 1].tolist())
            self.calls += 1
            self.results += bool(result)
            self.queues[b] = list(result)

    def pending(self) -> torch.Tensor:
        """``[B]`` bool: rows with tool tokens still to be fed."""
        return torch.tensor([bool(q) for q in self.queues], device=self.device)
