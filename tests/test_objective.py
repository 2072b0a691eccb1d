"""The objective (fastgfn/trainer/objective.py): floor rewards for states shorter than the
minimum length, the flow of the initial state per prompt (the policy's own, or a learned log Z
per prompt), the loss choice, and its wiring in the trainer."""

import dataclasses
import itertools

import pytest
import torch

from fastgfn.trainer import ConfigError, load_config
from fastgfn.trainer.objective import LogZ, Objective, resolve_initial_flow


def _cfg(*over):
    return load_config(None, ["model=tiny", *over])


def _brute_force_subtb(log_pf, log_pterm, log_r, lengths):
    """The modified SubTB loss with lambda = 1 in float64, one (i, j) pair at a time."""
    num = den = 0.0
    for b, n in enumerate(lengths.tolist()):
        for i, j in itertools.combinations(range(n + 1), 2):
            res = (log_r[b, i] + log_pf[b, i:j].sum() + log_pterm[b, j] - log_r[b, j]
                   - log_pterm[b, i])
            num += float(res) ** 2
            den += 1.0
    return num / den


def test_floor_reward_for_short_states_matches_brute_force():
    """min_new_tokens = 2, per-prompt flows: states s_0 and s_1 get the floor -99 (divided by
    the reward temperature) in place of their raw reward and keep the policy's own q(STOP);
    the loss equals a float64 brute force over every sub-trajectory."""
    cfg = _cfg("min_new_tokens=2", "max_new_tokens=4", "initial_flow=policy",
               "reward_temperature=0.5")
    obj = Objective(cfg, torch.device("cpu"), num_prompts=3)
    g = torch.Generator().manual_seed(0)
    B, T = 3, 4
    log_pf = -torch.rand(B, T, generator=g) * 3
    log_pterm = -torch.rand(B, T + 1, generator=g) * 4
    raw = -torch.rand(B, T + 1, generator=g) * 10
    lengths = torch.tensor([4, 2, 3])
    log_r = obj.tempered_log_rewards(raw, step=0)
    want_r = raw.double() / 0.5
    want_r[:, :2] = -99.0 / 0.5
    torch.testing.assert_close(log_r.double(), want_r)
    loss, flow = obj.loss(log_pf, log_pterm, log_r, lengths, torch.zeros(B, dtype=torch.bool), 1)
    want = _brute_force_subtb(log_pf.double(), log_pterm.double(), want_r, lengths)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert flow == pytest.approx(float((want_r[:, 0] - log_pterm[:, 0].double()).mean()))
    # the floor is not a constant of the pair set: a different floor changes the loss
    other = Objective(dataclasses.replace(cfg, min_length_log_reward=-5.0), "cpu", 3)
    loss5, _ = other.loss(log_pf, log_pterm, other.tempered_log_rewards(raw, 0), lengths,
                          torch.zeros(B, dtype=torch.bool), 1)
    assert abs(loss5.item() - want) > 1.0


def test_learned_log_z_is_per_prompt_and_refuses_unseen_prompts():
    cfg = _cfg("min_new_tokens=1", "initial_flow=log_z", "loss=subtb")
    obj = Objective(cfg, "cpu", num_prompts=2)
    assert obj.log_z.param.shape == (2,)
    with torch.no_grad():
        obj.log_z.param.copy_(torch.tensor([1.5, -7.0]))
    B, T = 2, 3
    log_pf, log_pterm, log_r = torch.zeros(B, T), torch.zeros(B, T + 1), torch.zeros(B, T + 1)
    lengths = torch.tensor([3, 1])
    dead = torch.zeros(B, dtype=torch.bool)
    for k, value in enumerate((1.5, -7.0)):
        loss, flow = obj.loss(log_pf, log_pterm, log_r, lengths, dead, k)
        assert flow == value
        # s_0's flow is log Z(X_k): pairs (0, j) have residual -log Z(X_k), the others 0
        want_r = torch.zeros(B, T + 1, dtype=torch.float64)
        want_pt = torch.zeros(B, T + 1, dtype=torch.float64)
        want_pt[:, 0] = -value
        want = _brute_force_subtb(log_pf.double(), want_pt, want_r, lengths)
        assert loss.item() == pytest.approx(want)
    with pytest.raises(ValueError, match="prompt_index"):
        obj.loss(log_pf, log_pterm, log_r, lengths, dead, 2)
    # TB uses the same table
    tb = Objective(dataclasses.replace(cfg, loss="tb"), "cpu", num_prompts=2)
    with torch.no_grad():
        tb.log_z.param.copy_(torch.tensor([2.0, 3.0]))
    loss, _ = tb.loss(log_pf, log_pterm, log_r, lengths, dead, 1)
    assert loss.item() == pytest.approx(9.0)
    loss.backward()
    assert tb.log_z.param.grad.tolist() == [0.0, 6.0]


def test_global_log_z_is_one_scalar_and_auto_picks_per_prompt_flows():
    cfg = _cfg("initial_flow=global_log_z")
    assert Objective(cfg, "cpu", num_prompts=5).log_z.param.shape == ()
    assert resolve_initial_flow("auto", 1) == "log_z"
    assert resolve_initial_flow("auto", 2) == "policy"
    assert Objective(_cfg(), "cpu", num_prompts=1).initial_flow == "log_z"
    assert Objective(_cfg(), "cpu", num_prompts=7).initial_flow == "policy"
    with pytest.raises(ConfigError, match="initial_flow"):
        _cfg("initial_flow=sometimes")
    with pytest.raises(ConfigError, match="min_length_log_reward"):
        _cfg("min_length_log_reward=nan")


def test_log_z_table_saves_and_loads_with_its_adam_state():
    z = LogZ(0.5, 0.1, "cpu", size=3)
    (z[1] * 2.0).backward()
    z.step()
    state = z.state_dict()
    again = LogZ(0.0, 0.1, "cpu", size=3)
    again.load_state_dict(state)
    assert torch.equal(again.param, z.param) and again.value(1) != 0.5
    for _ in range(2):
        for m in (z, again):
            (m[1] * 2.0).backward()
            m.step()
    assert torch.equal(again.param, z.param)
