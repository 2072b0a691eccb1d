"""What a run measures about itself beyond the loss (docs/TRAINING.md, "Arithmetic: why the
GFlowNet collapsed"): per micro-batch, the share of the SubTB loss that comes from
sub-trajectories starting at a floor state (shorter than ``min_new_tokens``), and on sampled
batches an estimate of the true log Z(X) beside the flow of s_0 the loss uses; every
``eval_every`` steps, the policy's log-probability of the task's worked rationales.

The log Z estimate is ``log mean_b exp(log R(z_b) / T - log q(z_b))`` over the batch's
rows z_b drawn from the behaviour policy q (the policy itself at temperature 1; a tempered
batch makes it a rougher estimate): an importance-sampling estimate of log sum_z R(z)^(1/T),
low in expectation, that a converged GFlowNet's log F(s_0) equals.
"""

from __future__ import annotations

import math

import torch

import fastgfn
from fastgfn.reference.subtb import subtb_pair_terms_reference


@torch.no_grad()
def floor_loss_share(log_pf, log_pterm, log_r, lengths, min_new_tokens: int, lam: float):
    """The fraction of the (weighted) SubTB loss from pairs whose first state is a floor
    state (i < ``min_new_tokens``); 0 when there is none."""
    if min_new_tokens <= 0:
        return 0.0
    w, res = subtb_pair_terms_reference(log_pf, log_pterm, log_r, lengths, lam)
    terms = w * res.square()  # [B, i, j]
    total = float(terms.sum())
    floor = float(terms[:, :min_new_tokens].sum())
    return floor / total if total > 0 else 0.0


@torch.no_grad()
def log_z_estimate(log_pf, log_pterm, log_r, lengths) -> float:
    """``log mean_b exp(log R(z_b) - log q(z_b))`` over the rows (``log_r`` tempered)."""
    log_w = -fastgfn.trajectory_log_ratio(log_pf.float(), log_pterm.float(), log_r.float(),
                                          lengths)
    log_w = log_w[torch.isfinite(log_w)]
    if log_w.numel() == 0:
        return float("nan")
    return float(torch.logsumexp(log_w.double(), 0) - math.log(log_w.numel()))


def batch_diagnostics(cfg, batch, log_pf, log_pterm, log_r, final) -> dict:
    """The micro-batch's diagnostics (``log_r`` tempered as the loss sees it, ``final`` the
    untempered final log-rewards): the floor share always, the sampled rows' log-reward,
    length and log Z estimate on batches that were not replayed."""
    n = batch.num_actions.to(log_pf.device)
    share = floor_loss_share(log_pf.detach(), log_pterm.detach(), log_r, n,
                             cfg.sampling.min_new_tokens, cfg.objective.subtb_lambda)
    out = {"floor_loss_share": share}
    if not batch.replayed:
        out.update(sampled_log_reward=float(final.mean()),
                   sampled_length=float(batch.num_actions.float().mean()),
                   log_z_estimate=log_z_estimate(log_pf.detach(), log_pterm.detach(), log_r, n))
    return out


@torch.no_grad()
def worked_rationale_metrics(engine, task, policy_bias, limit: int = 50) -> dict:
    """The policy's mean ``log q(z)`` (actions and the final stop, with its logit bias) and
    the mean untempered log-reward of the task's worked rationales (the first ``limit``);
    {} when the task has none."""
    from fastgfn.trainer.model.loading import eval_mode
    from fastgfn.trainer.replay_seed import scored_worked_rows
    from fastgfn.trainer.scoring import gfn_logprobs

    log_q, log_r, dev = [], [], engine.device
    with eval_mode(engine.module) as model:
        for w in scored_worked_rows(task):
            if w.prompt >= limit:
                break
            pf, pterm = gfn_logprobs(model, task.prompt_tokens(w.prompt).to(dev),
                                     w.tokens.to(dev), task.termination_token_id,
                                     vocab_bias=policy_bias,
                                     states=None if w.states is None else w.states.to(dev))
            n = sum(w.mask)
            log_q.append(float(pf[0, :n].sum() + pterm[0, n]))
            log_r.append(float(w.log_rewards[n]))
    if not log_q:
        return {}
    return {"worked_log_q": sum(log_q) / len(log_q), "worked_log_reward": sum(log_r) / len(log_r)}
