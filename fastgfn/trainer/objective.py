"""The objective: from a scored batch to the loss (docs/MATH.md §2-3).

Everything GFlowNet-specific between the scores and ``loss.backward()`` lives here:

- the rewards the loss sees: states shorter than ``min_new_tokens`` (where sampling never
  stops) get the floor ``min_length_log_reward`` instead of their raw reward (None: they
  keep it; docs/TRAINING.md "Arithmetic: why the GFlowNet collapsed" measures what a floor
  far below log Z does to the flows), then
  everything is divided by the reward temperature (its schedule is here too);
- forced stops: a row cut at a dead end by the rollout (``Batch.dead``: a state the task says
  can never become valid) or at ``max_new_tokens`` actions ends with ``log q(STOP) = 0``;
- the flow of the initial state s_0 given the prompt X, ``log F(s_0 | X) = log Z(X)``
  (``initial_flow``). ``policy``: every state keeps its flow ``log R(s) - log q(STOP | s)``
  from the policy's own termination probability, s_0 included (with the floor reward when
  it cannot stop), so Z(X) is amortised over prompts by the policy itself, as in the paper.
  ``log_z``: when termination is forbidden at s_0 (``min_new_tokens >= 1``), SubTB and DB
  take s_0's flow from a learned log Z per prompt (``log_r[0] - log_pterm[0] = log Z(X)``).
  ``global_log_z``: one learned scalar for every prompt (right only for one prompt: prompts'
  partition functions differ by many nats). ``auto``: ``policy`` with several prompts,
  ``log_z`` with one;
- log Z itself (``LogZ``: one value per prompt, or one for all, with its own Adam, averaged
  over the ranks), its initialisation from the first batch (``log_z_auto_init``), and TB's
  use of it (TB's log Z(X) is the same table: a fixed prompt set, unseen prompts refused);
- the loss choice (``loss``: subtb, db, tb, vargrad).
"""

from __future__ import annotations

import torch

import fastgfn
from fastgfn.trainer.engines.distributed import all_ranks_agree, all_reduce_mean_, rank
from fastgfn.trainer.errors import ConfigError
from fastgfn.trainer.sections import LOSSES


class LogZ:
    """Learned log Z values, one per prompt (``size`` of them; a scalar when ``size`` is 1),
    with their own Adam (learning rate ``log_z_lr``; none when 0). The gradient is averaged
    over the ranks before each step, so every rank keeps the same values. The Adam is the
    fused one, so a step the trainer skips (non-finite loss or gradients) is skipped on the
    device (``found_inf``), with no host sync."""

    def __init__(self, init: float, lr: float, device=None, size: int = 1):
        shape = () if size == 1 else (size,)
        self.param = torch.nn.Parameter(torch.full(shape, float(init), device=device))
        self.opt = torch.optim.Adam([self.param], lr=lr, fused=True) if lr > 0 else None

    def __getitem__(self, prompt_index: int) -> torch.Tensor:
        """log Z of prompt ``prompt_index`` (a differentiable scalar)."""
        if self.param.dim() == 0:
            return self.param
        if not 0 <= prompt_index < self.param.shape[0]:
            raise ValueError(
                f"prompt_index: log Z is learned for the {self.param.shape[0]} prompts of the "
                f"training set, got prompt {prompt_index}"
            )
        return self.param[prompt_index]

    def step(self, skip: torch.Tensor | bool = False) -> None:
        """One Adam step, or none (parameters and moments unchanged) where ``skip``."""
        if self.opt is None or self.param.grad is None:
            return
        all_reduce_mean_(self.param.grad)
        self.opt.grad_scale = None
        self.opt.found_inf = torch.as_tensor(skip, dtype=torch.float32).to(self.param.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def reset(self, value: torch.Tensor) -> float:
        """Set every log Z to ``value`` averaged over the ranks; the Adam moments start
        afresh. Returns the value set."""
        value = all_reduce_mean_(value.detach().to(self.param).reshape(()).clone())
        with torch.no_grad():
            self.param.fill_(value)
        if self.opt is not None:
            self.opt.state.clear()
        return float(value)

    def value(self, prompt_index: int = 0) -> float:
        return float(self[prompt_index].detach())

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


def resolve_initial_flow(requested: str, num_prompts: int) -> str:
    """``initial_flow``: 'auto' is 'policy' for several prompts and 'log_z' for one."""
    if requested != "auto":
        return requested
    return "policy" if num_prompts > 1 else "log_z"


class Objective:
    """The loss of a scored batch, and the state it learns (log Z)."""

    def __init__(self, cfg, device, num_prompts: int = 1):
        if cfg.objective.loss not in LOSSES:
            raise ConfigError(f"loss: must be one of {LOSSES}, got {cfg.objective.loss!r}")
        self.settings, self.sampling = cfg.objective, cfg.sampling  # the sections it reads
        self.initial_flow = resolve_initial_flow(cfg.objective.initial_flow, num_prompts)
        size = 1 if self.initial_flow == "global_log_z" else num_prompts
        self.log_z = LogZ(cfg.objective.log_z_init, cfg.objective.log_z_lr, device, size)
        self._log_z_set = False

    def reward_temperature(self, step: int) -> float:
        """Linear schedule from ``reward_temperature`` to ``reward_temperature_end``."""
        o = self.settings
        if o.reward_temperature_end is None or o.reward_temperature_steps <= 0:
            return o.reward_temperature
        f = min(1.0, step / o.reward_temperature_steps)
        return o.reward_temperature + f * (o.reward_temperature_end - o.reward_temperature)

    def tempered_log_rewards(self, log_r: torch.Tensor, step: int) -> torch.Tensor:
        """``log R`` of every prefix (``[B, T + 1]``, untempered) as the loss sees it: states
        shorter than ``min_new_tokens`` at the floor ``min_length_log_reward``, then divided
        by the reward temperature at ``step``."""
        short = min(self.sampling.min_new_tokens, log_r.shape[1])
        if short > 0 and self.settings.min_length_log_reward is not None:
            log_r = log_r.clone()
            log_r[:, :short] = self.settings.min_length_log_reward
        return log_r / self.reward_temperature(step)

    def loss(self, log_pf, log_pterm, log_r, lengths, dead, prompt_index: int = 0):
        """``(loss, log F(s_0 | X))`` of one micro-batch of prompt ``prompt_index``. ``log_r``
        comes from ``tempered_log_rewards``; ``dead`` marks rows that end at a dead end
        (forced stop). The second value is the flow of the initial state the loss used (the
        learned log Z, or the batch mean of the policy's own), for logging."""
        log_pf = log_pf.float()
        log_pterm = self.forced_stops(log_pterm.float(), lengths, dead)
        if self.settings.log_z_auto_init and not self._log_z_set:
            self._init_log_z(log_pf, log_pterm, log_r, lengths)
        log_z = self.log_z[prompt_index]
        uses_log_z = self.initial_flow != "policy" and self.sampling.min_new_tokens >= 1
        if uses_log_z and self.settings.loss in ("subtb", "db"):
            log_pterm, log_r = self._s0_flow_from_log_z(log_pterm, log_r, log_z)
        if uses_log_z or self.settings.loss == "tb":
            flow = log_z
        else:
            flow = (log_r[:, 0] - log_pterm[:, 0]).mean()
        return self._loss_of(log_pf, log_pterm, log_r, lengths, log_z), float(flow.detach())

    def forced_stops(self, log_pterm, lengths, dead):
        """``log_pterm`` with 0 (P(STOP) = 1) at the final state of every row whose stop was
        forced: a dead end (``dead``), or ``max_new_tokens`` actions, where the sampler has no
        other move. Left to the policy, that state's stop probability is a free parameter:
        the loss can balance a row's flows by lowering it (a high F(s_n) = R / P(STOP))
        instead of by raising the row's action probabilities."""
        forced = dead.to(lengths.device) | (lengths >= self.sampling.max_new_tokens)
        if not forced.any():
            return log_pterm
        at_end = torch.arange(log_pterm.shape[1], device=lengths.device)[None] == lengths[:, None]
        return log_pterm.masked_fill((at_end & forced[:, None]).to(log_pterm.device), 0.0)

    def _loss_of(self, log_pf, log_pterm, log_r, lengths, log_z):
        if self.settings.loss == "subtb":
            return fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths,
                                      lam=self.settings.subtb_lambda)
        if self.settings.loss == "db":
            return fastgfn.db_loss(log_pf, log_pterm, log_r, lengths)
        if self.settings.loss == "tb":
            return fastgfn.tb_loss(log_pf, log_pterm, log_r, lengths, log_z)
        return fastgfn.vargrad_loss(log_pf, log_pterm, log_r, lengths)

    @staticmethod
    def _s0_flow_from_log_z(log_pterm, log_r, log_z):
        """s_0 cannot terminate: its flow R(s_0) / P(STOP | s_0) is the learned log Z
        (``log_r[0] - log_pterm[0] = log Z``)."""
        log_r = log_r.clone()
        log_r[:, 0] = 0.0
        s0 = (-log_z).expand(log_pterm.shape[0], 1).to(log_pterm)
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
