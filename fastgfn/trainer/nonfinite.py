"""Never training on NaN: the policy for non-finite rewards, losses and gradients.

- A micro-batch whose loss is not finite, or whose rewards are not finite at a state the loss
  uses, has its loss multiplied by NaN before ``backward`` (by exactly 1.0 otherwise, which
  changes no bit), so every gradient of the step is NaN and its norm is not finite.
- The engine skips a step whose gradient norm is not finite: the torch engine and the stage-0
  DeepSpeed engine on the device (fused AdamW's ``found_inf``, no host sync), ZeRO-1/2/3
  through DeepSpeed's own overflow check. Parameters and optimizer moments stay as they were,
  the gradients are zeroed, and log Z is not stepped either. The learning-rate schedule goes
  on (it follows the step count).
- The flag is read on the host with the step's other metrics (one read of the grad norm and
  the flag together, where the norm was read before), counted in ``skipped_steps`` and logged
  (``skipped``); ``max_nonfinite_steps`` skipped steps in a row stop the run with a
  ``TrainingError``.
- A row with a non-finite reward never enters the replay buffer, and the rows are reported
  (prompt, row, text), once per micro-batch, by the rank that drew them. Rewards come back on
  the CPU, so checking them costs no device sync.
"""

from __future__ import annotations

import torch

from fastgfn.trainer.errors import TrainingError


def nonfinite_rows(log_r: torch.Tensor, lengths: torch.Tensor) -> list[int]:
    """Rows whose log-reward is not finite at a state the loss reads (prefixes 0..length)."""
    T = log_r.shape[1]
    used = torch.arange(T)[None] <= lengths.cpu()[:, None]
    bad = (~torch.isfinite(log_r.cpu().float()) & used).any(1)
    return bad.nonzero().flatten().tolist()


def report_rows(task, batch, rows: list[int], log_r: torch.Tensor, step: int, who: str) -> str:
    """One line naming the micro-batch's rows with non-finite rewards."""
    shown = []
    for b in rows[:4]:
        values = log_r[b, : int(batch.num_actions[b]) + 1]
        bad = values[~torch.isfinite(values)]
        shown.append(f"row {b} {task.text(batch.rows[b])!r} (log R {float(bad[0])})")
    more = f" and {len(rows) - 4} more" if len(rows) > 4 else ""
    prompt = task.prompt_text(batch.prompt_index)
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return (f"fastgfn: step {step}{who}: non-finite reward from task {task.name!r}, prompt "
            f"{batch.prompt_index} {prompt!r}: {', '.join(shown)}{more}; the step is skipped "
            "and these rows are kept out of the replay buffer")


def poisoned(loss: torch.Tensor, bad_rewards: bool) -> torch.Tensor:
    """``loss`` times 1.0, or times NaN when it (or a reward it used) is not finite, so the
    step's gradients are all NaN and the engine skips it. No host sync."""
    if bad_rewards:
        return loss * float("nan")
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


class SkipCounter:
    """Skipped steps: the total (kept in checkpoints) and the current run of them in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, skipped: bool) -> None:
        if skipped:
            self.total += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0

    def check(self, step: int, grad_norm: float, loss: float) -> None:
        """A ``TrainingError`` once ``limit`` steps in a row were skipped."""
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss, "
                f"reward or gradient norm (last: loss {loss}, gradient norm {grad_norm}) and "
                f"were skipped (max_nonfinite_steps={self.limit}); the weights are those of "
                "the last good step. Check the task's rewards and the learning rate; the last "
                "checkpoint is unaffected")
