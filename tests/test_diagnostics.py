"""fastgfn/trainer/reporting/diagnostics.py and the pair terms it reads from the reference:
every value against a float64 brute force over the pairs or the trajectories, with irregular
lengths, an empty sequence and padding that holds -inf."""

import math
from types import SimpleNamespace

import pytest
import torch

import fastgfn
from fastgfn.reference.subtb import subtb_pair_terms_reference
from fastgfn.trainer.config import Config
from fastgfn.trainer.reporting.diagnostics import (
    batch_diagnostics,
    floor_loss_share,
    log_z_estimate,
)

from .test_subtb import brute_force_pair_sums, random_batch


def _with_inf_padding(log_pf, log_pterm, log_r, lengths):
    log_pterm, log_r = log_pterm.clone(), log_r.clone()
    for b, n in enumerate(lengths.tolist()):
        log_pterm[b, n + 1:] = -math.inf
        log_r[b, n + 1:] = -math.inf
    return log_pf, log_pterm, log_r, lengths


@pytest.mark.parametrize("lam", [0.9, 1.0, 1.7])
def test_pair_terms_give_the_loss_and_the_brute_force(lam):
    batch = _with_inf_padding(*random_batch(5, 7, seed=3))
    w, res = subtb_pair_terms_reference(*batch, lam)
    num, den = brute_force_pair_sums(*batch, lam)
    terms = w * res.square()
    torch.testing.assert_close(terms.sum((1, 2)), num, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.sum((1, 2)), den, rtol=1e-10, atol=1e-10)
    loss = fastgfn.subtb_loss(*(x.double() for x in batch[:3]), batch[3], lam=lam)
    assert float(terms.sum() / w.sum()) == pytest.approx(float(loss), rel=1e-9)


def _brute_force_floor_share(log_pf, log_pterm, log_r, lengths, m, lam):
    floor = total = 0.0
    for b, n in enumerate(lengths.tolist()):
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                path = float(log_pf[b, i:j].double().sum())
                res = (float(log_r[b, i]) - float(log_pterm[b, i]) + path
                       - float(log_r[b, j]) + float(log_pterm[b, j]))
                term = lam ** (j - i - 1) * res * res
                total += term
                floor += term if i < m else 0.0
    return floor / total


@pytest.mark.parametrize("m, lam", [(1, 1.0), (3, 0.9), (5, 1.5)])
def test_floor_loss_share_matches_brute_force(m, lam):
    batch = _with_inf_padding(*random_batch(6, 8, seed=m))
    got = floor_loss_share(*batch, m, lam)
    assert got == pytest.approx(_brute_force_floor_share(*batch, m, lam), rel=1e-9)
    assert floor_loss_share(*batch, 0, lam) == 0.0


def test_log_z_estimate_is_the_log_mean_importance_weight():
    log_pf, log_pterm, log_r, lengths = random_batch(6, 5, seed=1, scale=6.0)
    want = []
    for b, n in enumerate(lengths.tolist()):
        log_q = float(log_pf[b, :n].sum() + log_pterm[b, n])
        want.append(float(log_r[b, n]) - log_q)
    want = math.log(sum(math.exp(x) for x in want) / len(want))
    assert log_z_estimate(log_pf, log_pterm, log_r, lengths) == pytest.approx(want, rel=1e-5)
    log_r = log_r.clone()
    log_r[0, int(lengths[0])] = -math.inf  # a row with no reward does not count
    rest = [float(log_r[b, n]) - float(log_pf[b, :n].sum() + log_pterm[b, n])
            for b, n in enumerate(lengths.tolist()) if b > 0]
    want = math.log(sum(math.exp(x) for x in rest) / len(rest))
    assert log_z_estimate(log_pf, log_pterm, log_r, lengths) == pytest.approx(want, rel=1e-5)


def test_batch_diagnostics_report_sampled_rows_only_when_not_replayed():
    log_pf, log_pterm, log_r, lengths = random_batch(4, 6, seed=2)
    cfg = Config(min_new_tokens=2, subtb_lambda=1.0)
    final = log_r.gather(1, lengths[:, None]).squeeze(1)
    for replayed in (False, True):
        batch = SimpleNamespace(num_actions=lengths, replayed=replayed)
        out = batch_diagnostics(cfg, batch, log_pf, log_pterm, log_r, final)
        assert out["floor_loss_share"] == pytest.approx(
            floor_loss_share(log_pf, log_pterm, log_r, lengths, 2, 1.0))
        assert ("sampled_log_reward" in out) == (not replayed)
        if not replayed:
            assert out["sampled_length"] == pytest.approx(float(lengths.float().mean()))
            assert out["sampled_log_reward"] == pytest.approx(float(final.mean()))
