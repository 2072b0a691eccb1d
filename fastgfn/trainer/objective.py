"""The objective: from a scored batch to the loss (docs/MATH.md §2-3).

Everything GFlowNet-specific between the scores and ``loss.backward()`` lives here:

- the reward temperature schedule (``log_r = log R / T``);
- dead ends: a row that reaches a state the task says can never become valid is cut there
  and ends as a forced stop (``log q(STOP | dead state) = 0``) with the task's reward;
- the flow of the initial state s_0: when termination is forbidden there
  (``min_new_tokens >= 1``), SubTB and DB take s_0's flow from a learned log Z
  (``log_r[0] - log_pterm[0] = log Z``);
- log Z itself (``LogZ``: a scalar with its own Adam, averaged over the ranks), its
  initialisation from the first batch (``log_z_auto_init``), and TB's use of it;
- the loss choice (``loss``: subtb, db, tb, vargrad).
"""

from __future__ import annotations

import torch

import fastgfn
from fastgfn.trainer.engines.distributed import all_ranks_agree, all_reduce_mean_, rank
from fastgfn.trainer.errors import ConfigError

LOSSES = ("subtb", "db", "tb", "vargrad")


class LogZ:
    """A learned scalar log Z with its own Adam (learning rate ``log_z_lr``; none when 0). Its
    gradient is averaged over the ranks before each step, so every rank keeps the same value.
    The Adam is the fused one, so a step the trainer skips (non-finite loss or gradients) is
    skipped on the device (``found_inf``), with no host sync."""

    def __init__(self, init: float, lr: float, device=None):
        self.param = torch.nn.Parameter(torch.tensor(float(init), device=device))
        self.opt = torch.optim.Adam([self.param], lr=lr, fused=True) if lr > 0 else None

    def step(self, skip: torch.Tensor | bool = False) -> None:
        """One Adam step, or none (parameter and moments unchanged) where ``skip``."""
        if self.opt is None or self.param.grad is None:
            return
        all_reduce_mean_(self.param.grad)
        self.opt.grad_scale = None
        self.opt.found_inf = torch.as_tensor(skip, dtype=torch.float32).to(self.param.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def reset(self, value: torch.Tensor) -> float:
        """Set log Z to ``value`` averaged over the ranks; the Adam moments start afresh.
        Returns the value set."""
        value = all_reduce_mean_(value.detach().to(self.param).reshape(()).clone())
        with torch.no_grad():
            self.param.fill_(value)
        if self.opt is not None:
            self.opt.state.clear()
        return float(value)

    def value(self) -> float:
        return float(self.param.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved as safetensors): the value and the Adam state, if any."""
        state = {"value": self.param.detach().clone()}
        if self.opt is not None and self.param in self.opt.state:
            for k, v in self.opt.state[self.param].items():
                state[f"adam.{k}"] = torch.as_tensor(v).detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.param.copy_(state["value"])
        adam = {k[5:]: v.to(self.param.device) for k, v in state.items() if k.startswith("adam.")}
        if self.opt is not None and adam:
            self.opt.state[self.param] = adam


class Objective:
    """The loss of a scored batch, and the state it learns (log Z)."""

    def __init__(self, cfg, device):
        if cfg.loss not in LOSSES:
            raise ConfigError(f"loss: must be one of {LOSSES}, got {cfg.loss!r}")
        self.cfg = cfg
        self.log_z = LogZ(cfg.log_z_init, cfg.log_z_lr, device)
        self._log_z_set = False

    def reward_temperature(self, step: int) -> float:
        """Linear schedule from ``reward_temperature`` to ``reward_temperature_end``."""
        cfg = self.cfg
        if cfg.reward_temperature_end is None or cfg.reward_temperature_steps <= 0:
            return cfg.reward_temperature
        f = min(1.0, step / cfg.reward_temperature_steps)
        return cfg.reward_temperature + f * (cfg.reward_temperature_end - cfg.reward_temperature)

    def cut_dead_ends(self, task, rows: list[list[int]], lengths: torch.Tensor) -> torch.Tensor:
        """Cut every row at its first dead state (``task.dead_index``; with ``dead_ends``):
        ``rows`` and ``lengths`` are changed in place. Returns the rows that were cut."""
        dead = torch.zeros(len(rows), dtype=torch.bool)
        if not self.cfg.dead_ends:
            return dead
        for b, row in enumerate(rows):
            t = task.dead_index(row)
            if t is not None:
                rows[b] = row[:t]
                lengths[b] = t
                dead[b] = True
        return dead

    def loss(self, log_pf, log_pterm, log_r, lengths, dead) -> torch.Tensor:
        """The configured loss of one micro-batch. ``log_r`` is already tempered; ``dead``
        marks rows that end at a dead end (forced stop)."""
        cfg = self.cfg
        log_pf, log_pterm = log_pf.float(), log_pterm.float()
        if dead.any():  # a dead end is a forced stop: P(STOP | dead state) = 1
            at_end = torch.arange(log_pterm.shape[1])[None] == lengths.cpu()[:, None]
            log_pterm = log_pterm.masked_fill((at_end & dead[:, None]).to(log_pterm.device), 0.0)
        if cfg.log_z_auto_init and not self._log_z_set:
            self._init_log_z(log_pf, log_pterm, log_r, lengths)
        if cfg.min_new_tokens >= 1 and cfg.loss in ("subtb", "db"):
            log_pterm, log_r = self._s0_flow_from_log_z(log_pterm, log_r)
        if cfg.loss == "subtb":
            return fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths, lam=cfg.subtb_lambda)
        if cfg.loss == "db":
            return fastgfn.db_loss(log_pf, log_pterm, log_r, lengths)
        if cfg.loss == "tb":
            return fastgfn.tb_loss(log_pf, log_pterm, log_r, lengths, self.log_z.param)
        return fastgfn.vargrad_loss(log_pf, log_pterm, log_r, lengths)

    def _s0_flow_from_log_z(self, log_pterm, log_r):
        """s_0 cannot terminate: its flow R(s_0) / P(STOP | s_0) is the learned log Z
        (``log_r[0] - log_pterm[0] = log Z``)."""
        log_r = log_r.clone()
        log_r[:, 0] = 0.0
        s0 = (-self.log_z.param).expand(log_pterm.shape[0], 1).to(log_pterm)
        return torch.cat([s0, log_pterm[:, 1:]], dim=1), log_r

    def _init_log_z(self, log_pf, log_pterm, log_r, lengths) -> None:
        """log Z from the first (on-policy) batch: the mean over its rows of ``log R(z) -
        log q(z)`` with ``log q(z) = sum_t log_pf + log_pterm(end)``, the log Z that minimises
        the squared TB residual of the initial policy, averaged over the ranks. Far-off initial
        values (rewards of -50 nats against log Z = 0) otherwise let the policy balance the
        flows by never terminating instead of by moving log Z."""
        with torch.no_grad():
            ratio = fastgfn.trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)  # log q/R
            finite = torch.isfinite(ratio)  # rows with a non-finite reward do not count
            if not all_ranks_agree(bool(finite.any())):
                return  # a rank has no finite row: a later batch initialises log Z
            value = self.log_z.reset(-ratio[finite].mean())
        self._log_z_set = True
        if rank() == 0:
            print(f"fastgfn: log Z initialised to {value:.3f} from the first batch")

    def step(self, skip: torch.Tensor | bool = False) -> None:
        """After the engine's optimizer step: log Z's own step (none where ``skip``)."""
        self.log_z.step(skip)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"log_z.{k}": v for k, v in self.log_z.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.log_z.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("log_z.")})
        self._log_z_set = True  # a resumed run never re-initialises log Z
