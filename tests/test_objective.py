"""The objective (fastgfn/trainer/objective.py): floor rewards for states shorter than the
minimum length, the flow of the initial state per prompt (the policy's own, or a learned log Z
per prompt), the loss choice, and its wiring in the trainer."""

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
    the row of ``max_new_tokens`` actions ends with a forced stop (log P(STOP) = 0 there);
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
    forced = log_pterm.double().clone()
    forced[0, 4] = 0.0  # row 0 has max_new_tokens = 4 actions: the sampler stopped it
    want = _brute_force_subtb(log_pf.double(), forced, want_r, lengths)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    unforced = _brute_force_subtb(log_pf.double(), log_pterm.double(), want_r, lengths)
    assert abs(unforced - want) > 1e-2
    assert flow == pytest.approx(float((want_r[:, 0] - log_pterm[:, 0].double()).mean()))
    # the floor is not a constant of the pair set: a different floor changes the loss
    other = Objective(cfg.replace(min_length_log_reward=-5.0), "cpu", 3)
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
    tb = Objective(cfg.replace(loss="tb"), "cpu", num_prompts=2)
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


def _exact_target_batch(task, prompt_index: int, floor: float):
    """Every trajectory of the two-prompt task (4 one-token and 16 two-token continuations)
    scored by the prompt's exact GFlowNet: flows F(ab) = R(ab) (the last state stops),
    F(a) = R(a) + sum_b F(ab), F(s0) = exp(floor) + sum_a F(a) (s0 stops only with the floor
    reward); q(next | s) = F(next) / F(s), q(STOP | s) = R(s) / F(s). Returns the loss inputs
    (float64) and log Z(X) = log sum_a F(a)."""
    t = task.table[prompt_index]
    one, two = t["one"].double(), t["two"].double()
    log_fa = torch.logaddexp(one, torch.logsumexp(two, 1))  # log F(a)
    log_z = torch.logsumexp(log_fa, 0)
    log_f0 = torch.logaddexp(log_z, torch.tensor(floor, dtype=torch.float64))
    rows = []
    for a in range(4):
        rows.append(([log_fa[a] - log_f0], [floor - log_f0, one[a] - log_fa[a]],
                     [floor, one[a]]))
        for b in range(4):
            rows.append(([log_fa[a] - log_f0, two[a, b] - log_fa[a]],
                         [floor - log_f0, one[a] - log_fa[a], torch.tensor(0.0)],
                         [floor, one[a], two[a, b]]))
    B = len(rows)
    log_pf, log_pterm, log_r = torch.zeros(B, 2), torch.zeros(B, 3), torch.zeros(B, 3)
    lengths = torch.tensor([len(pf) for pf, _, _ in rows])
    for i, (pf, pt, r) in enumerate(rows):
        log_pf[i, :len(pf)] = torch.stack([torch.as_tensor(x) for x in pf]).float()
        log_pterm[i, :len(pt)] = torch.stack([torch.as_tensor(x) for x in pt]).float()
        log_r[i, :len(r)] = torch.stack([torch.as_tensor(x) for x in r]).float()
    return log_pf.double(), log_pterm.double(), log_r.double(), lengths, float(log_z)


def test_only_per_prompt_flows_balance_the_exact_target():
    """Two prompts whose partition functions differ by several nats, each batch scored by its
    prompt's exact target policy: the per-prompt constructions (the policy's own q(STOP | s0)
    with the floor reward, or a learned log Z per prompt at its true value) give zero loss on
    both prompts, so training can end there; one global log Z cannot, whatever its value: the
    sub-trajectories from s0 keep residual c - log Z(X), and the summed loss of the two prompts
    is at least (share of pairs from s0) * (log Z(B) - log Z(A))^2 / 2."""
    from fastgfn.trainer.model.loading import CharTokenizer

    from .two_prompt_task import TwoPromptTask

    task = TwoPromptTask(CharTokenizer())
    floor = -99.0
    batches = [_exact_target_batch(task, k, floor) for k in range(2)]
    log_zs = [b[4] for b in batches]
    gap = log_zs[1] - log_zs[0]
    assert gap > 5.0
    dead = torch.zeros(20, dtype=torch.bool)

    def loss(obj, k):
        log_pf, log_pterm, log_r, lengths, _ = batches[k]
        return obj.loss(log_pf, log_pterm, obj.tempered_log_rewards(log_r, 0), lengths, dead,
                        k)[0].item()

    policy = Objective(_cfg("initial_flow=policy", f"min_length_log_reward={floor}"), "cpu", 2)
    table = Objective(_cfg("initial_flow=log_z"), "cpu", 2)
    with torch.no_grad():
        table.log_z.param.copy_(torch.tensor(log_zs))
    for k in range(2):
        assert loss(policy, k) < 1e-9 and loss(table, k) < 1e-9
    share = 36 / 52  # pairs that start at s0: 2 of 3 per two-token row, 1 of 1 per one-token
    glob = Objective(_cfg("initial_flow=global_log_z"), "cpu", 2)
    best = float("inf")
    for c in torch.linspace(log_zs[0] - 2, log_zs[1] + 2, 401).tolist():
        with torch.no_grad():
            glob.log_z.param.fill_(c)
        best = min(best, loss(glob, 0) + loss(glob, 1))
    assert best == pytest.approx(share * gap**2 / 2, rel=1e-3)
    assert best > 10.0


def test_training_with_per_prompt_flows_learns_both_prompts(tmp_path, monkeypatch):
    """A tiny model trained on the two-prompt task (log Z 3.6 and 10.1 nats) with the default
    objective for several prompts (initial_flow=auto: the policy's own flows, floor rewards
    for the empty state): the exact KL between each prompt's target p(z | X) and the policy's
    terminating distribution, over all 1-2 token continuations, falls below 0.6 of its start
    for both prompts (an untrained policy stays at 1.0), as the median of three seeds. The KL
    after training is one point of a noisy trajectory: float rounding alone (another CPU's
    kernels, another SDPA kernel, the lean layers) moves one seed's value by up to +-0.3 of the
    start, and a seed sometimes leaves a prompt half-learnt. Measured at lr 3e-3 (cosine), 600
    steps, on 2 cores of a Zen 5 EPYC, (prompt 0, prompt 1) of the start: seeds 1-6 with
    transformers' layers (0.16, 0.69), (0.25, 0.23), (0.34, 0.27), (0.41, 0.18), (0.39, 0.31),
    (0.31, 0.22); with the lean layers (0.18, 0.70), (0.42, 0.13), (0.40, 0.16), (0.42, 0.17),
    (0.40, 0.36), (0.30, 0.16); seeds 2-4 here."""
    from fastgfn.trainer import Trainer
    from fastgfn.trainer.tasks import TASKS

    from .two_prompt_task import exact_kl, log_partition

    monkeypatch.setitem(TASKS, "two_prompts", ("tests.two_prompt_task", "TwoPromptTask"))
    ratios = []
    for seed in (2, 3, 4):
        cfg = load_config(None, [
            "model=tiny", "tiny_hidden=32", "tiny_layers=2", "task=two_prompts",
            "termination=.", "batch_size=32", "max_new_tokens=2", "min_new_tokens=1",
            "steps=600", "lr=3e-3", "warmup_steps=0", "lr_schedule=cosine",
            "replay_prob=0.25", "explore_prob=0.25", "explore_vocab_prob=0.5",
            "progress=false", "eval_samples=0", "sample_dtype=model", f"seed={seed}",
            "save_model=false", "min_length_log_reward=-20", f"output_dir={tmp_path / str(seed)}",
        ])
        tr = Trainer(cfg)
        assert tr.objective.initial_flow == "policy"
        task, policy = tr.task, tr.engine.module
        assert log_partition(task, 1) - log_partition(task, 0) > 5.0
        before = [exact_kl(policy, task, k) for k in range(2)]
        policy.train()
        tr.run()
        ratios.append([exact_kl(policy, task, k) / before[k] for k in range(2)])
    print(f"KL after / before, seeds 2-4: {ratios}")
    for k in range(2):
        median = sorted(r[k] for r in ratios)[1]
        assert median < 0.6, (k, ratios)
