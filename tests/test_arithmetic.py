"""The arithmetic task (paper section 4.4): its few-shot reward prefix, vocabulary, answers,
rewards at the states of rows with calculator results (float64 brute force), training with
the tool (replay buffer masks, exact resume), and the evaluation command."""

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from fastgfn.trainer import ConfigError, Trainer, load_config
from fastgfn.trainer.model.loading import eval_mode
from fastgfn.trainer.model.reward import RewardLM
from fastgfn.trainer.scoring import gfn_logprobs, state_positions
from fastgfn.trainer.tasks import build_task
from fastgfn.trainer.tasks.arithmetic import ArithmeticTask, final_answer
from fastgfn.trainer.tools.calculator import CalculatorTool

from .arith_tiny import patch_build_tiny, pretrained_state
from .test_continuation import _tiny_lm, brute_force_log_reward
from .test_reasoning import brute_force_answer

CONFIG = "configs/arithmetic.yaml"
TINY = ["model=tiny", "tiny_hidden=32", "num_threads=1", "progress=false", "eval_samples=0",
        "histogram=false", "training_curves=false", "save_model=false", "batch_size=4",
        "max_new_tokens=12"]


@pytest.mark.parametrize("text, value", [
    (" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6", -6), (" 5 + 9 = 14, 14 - 3 = 11", 11),
    (" 2 - 8 = -6", -6), (" 3 + 4 = 7, 7 + 1", 7), (" -6", -6), (" 12", 12), (" 12.", 12),
    (" 6 - 0 =", None), (" 6 - 0 = x", None), ("", None), (" 6 - 0", None),
    (" 1 + 2 = 3 4", None), (" 6 = 6 - 1", None),
])
def test_final_answer(text, value):
    assert final_answer(text) == value


def _cfg(*extra):
    return load_config(CONFIG, TINY + list(extra))


@pytest.fixture(scope="module")
def lm():
    return _tiny_lm(sharpen=4.0)


def _arith(lm, *extra):
    model, tok = lm
    return build_task(_cfg("tool=calculator", *extra), tok, RewardLM(model))


def test_fewshot_prefix_and_prompts(lm):
    _, tok = lm
    task = _arith(lm)
    assert task.fewshot == (
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6. The answer is -6.\n"
        "Question: 5 + 9 - 3 + 8 = ? Answer: 5 + 9 = 14, 14 - 3 = 11, 11 + 8 = 19. The answer "
        "is 19.\nQuestion: 9 + 4 - 8 = ? Answer: 9 + 4 = 13, 13 - 8 = 5. The answer is 5.\n")
    x = tok.encode(task.prompts[7])
    fx = tok.encode(task.fewshot) + x
    assert task.prompt_tokens(7).tolist() == x  # the paper's policy sees the question only
    assert task.reward_prompt_tokens(7).tolist() == fx
    assert _arith(lm, "fewshot_in_policy=true").prompt_tokens(7).tolist() == fx
    assert _arith(lm, "fewshot_examples=0").reward_prompt_tokens(7).tolist() == x
    assert task.answer_texts[0] == " The answer is -6."
    assert isinstance(task.tool(), CalculatorTool)


def test_vocabulary_constraint(lm):
    _, tok = lm
    task = _arith(lm)
    legal = set(range(len(tok))) - set(task.illegal_token_ids())
    assert {tok.decode([i]) for i in legal} == set(" 0123456789+-=,.")
    bias = task.policy_logit_bias()
    assert bias is not None and float(bias[tok.encode("a")[0]]) == -99.0
    assert float(bias[task.termination_token_id]) == 0.0


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="fewshot_examples: .* fewer than 60"):
        _cfg("fewshot_examples=60")
    bad = tmp_path / "few.json"
    bad.write_text(json.dumps([{"str_query": "Q", "num_sol": 1}]))
    with pytest.raises(ConfigError, match="no field 'str_rationale'"):
        _cfg(f"fewshot_path={bad}", "fewshot_examples=1")
    with pytest.raises(ConfigError, match="tool: must be one of"):
        _cfg("tool=abacus")
    with pytest.raises(ConfigError, match="tool_max_operands"):
        _cfg("tool_max_operands=1")
    with pytest.raises(ConfigError, match="dead ends"):
        load_config(None, ["model=tiny", "tool=calculator"])  # random_number has dead ends
    load_config(None, ["model=tiny", "tool=calculator", "dead_ends=false"])


def _with_tool(tok, calc, actions: str):
    """The row the sampler would produce for these actions: ``(tokens, action mask)``."""
    row, mask = [], []
    for ch in actions:
        row += tok.encode(ch)
        mask.append(True)
        if row[-1] in calc.trigger_ids:
            result = calc.call(row)
            row += result
            mask += [False] * len(result)
    return row, mask


def test_state_rewards_match_brute_force(lm):
    """``state_log_rewards`` at the states of rows with calculator results (and the empty
    row) equals ``log p(s_t STOP | F X) + log p(Y | F X s_t STOP)`` in float64, the few-shot
    prefix F and the vocabulary bias on the rationale included; the tool's tokens count in
    the rationale's likelihood, and only states are scored."""
    model, tok = lm
    task = _arith(lm, "fewshot_examples=1")
    calc, term = task.tool(), task.termination_token_id
    texts = [" 6-0=, 6-4=", "", " 9+8= x", " 2-8=, -6+1=", " 5 5="]
    rows, masks = zip(*(_with_tool(tok, calc, t) for t in texts))
    assert [m.count(False) for m in masks] == [4, 0, 3, 6, 0]
    W = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), W, dtype=torch.bool)
    for b, m in enumerate(masks):
        mask[b, : len(m)] = torch.tensor(m)
    lengths = torch.tensor([len(r) for r in rows])
    states, n = state_positions(mask, lengths)
    p = 4
    got = task.state_log_rewards(p, [list(r) for r in rows], W, states)
    assert got.shape == states.shape
    prompt = task.reward_prompt_tokens(p).tolist()
    answer = task.answer_tokens(p).tolist()
    bias = task.vocab_bias()
    for b, row in enumerate(rows):
        for t in range(int(n[b]) + 1):
            prefix = row[: int(states[b, t])]
            want = (brute_force_log_reward(model, prompt, prefix, term, bias)
                    + brute_force_answer(model, prompt, prefix, term, answer))
            assert got[b, t].item() == pytest.approx(want, abs=5e-4), (b, t)
    # the same rows without a mask: every token prefix, the states among them agree
    every = task.log_rewards(p, [list(r) for r in rows], W)
    torch.testing.assert_close(every.gather(1, states), got, atol=1e-4, rtol=0)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def taught():
    """The tiny model taught the rationale format (tests/arith_tiny.py)."""
    return pretrained_state()


def test_training_with_the_tool_resumes_exactly(tmp_path, taught, monkeypatch):
    """Rows with calculator results train (the loss sees actions only), go to the replay
    buffer with their masks, and a run interrupted and resumed ends bit for bit where an
    uninterrupted one does, buffer masks included."""
    patch_build_tiny(taught, monkeypatch.setattr)
    common = TINY + ["tool=calculator", "save_every=2", "replay_prob=0.5", "steps=6",
                     "eval_questions=0"]
    full = Trainer(load_config(CONFIG, common + [f"output_dir={tmp_path / 'a'}"]))
    full.run()
    part = Trainer(load_config(CONFIG, common + ["stop_after_steps=3",
                                                 f"output_dir={tmp_path / 'b'}"]))
    assert part.run().get("interrupted")
    resumed = Trainer(load_config(CONFIG, common + [f"output_dir={tmp_path / 'b'}",
                                                    "resume=true"]))
    assert resumed.maybe_resume() and resumed.step == 3
    resumed.cfg.run.resume = False
    resumed.run()
    a, b = _params(full.engine.module), _params(resumed.engine.module)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert full.buffer.state_dict() == resumed.buffer.state_dict()
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_00000006" /
                        "client_state.json").read_text())["buffer"]["entries"]
    assert any(len(e) == 3 for v in saved.values() for e in v)  # masks went to the JSON
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["length"] <= 12 for x in lines if "length" in x)  # actions, not tokens


def test_eval_command_end_to_end(tmp_path, capsys):
    """The evaluation command on a tiny model: every method, every test set, greedy and
    majority accuracies that match the stored rationales' answers."""
    from fastgfn.trainer.evaluation.arithmetic.cli import main

    out = tmp_path / "eval"
    main(["--config", CONFIG, "--policy", "tinypolicy=tiny+fewshot", "--zeroshot", "--limit",
          "2", "--k", "3", "--max_new_tokens", "6", "--out", str(out)] + TINY[:3])
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert list(report["results"]) == ["3 operands", "4 operands", "5 operands (OOD)"]
    for name, methods in report["results"].items():
        assert list(methods) == ["few-shot (base LM)", "zero-shot (base LM)", "tinypolicy"]
        assert f"### {name} (2 problems)" in printed
        for r in methods.values():
            assert r["problems"] == 2 and len(r["rows"]) == 2
            for row in r["rows"]:
                assert len(row["texts"]) == 4 and row["greedy"] == final_answer(row["texts"][0])
            acc = sum(x["greedy"] == x["answer"] for x in r["rows"]) / 2
            assert r["greedy_accuracy"] == acc
        for label, r in methods.items():  # the summary: one accuracy per method and set, %
            assert report["accuracy"][name][label]["greedy"] == 100 * r["greedy_accuracy"]
    assert (out / "tables.md").read_text() in printed
    assert report["settings"]["k"] == 3 and report["settings"]["tool"] == "calculator"
    assert "cores" in report["settings"]["machine"]


def test_arithmetic_configs_load():
    cfg = load_config(CONFIG)
    assert (cfg.task.name, cfg.task.tool, cfg.task.termination) == ("arithmetic", "calculator", ".")
    assert Path(cfg.task.data_path).is_file() and Path(cfg.task.eval_data_path).is_file()
    paper = load_config("paper/arithmetic.yaml")
    assert paper.model.name == "nlpcloud/instruct-gpt-j-fp16"
    assert paper.model.lora and paper.model.lora_r == 64
    s = paper.sampling
    assert (s.max_new_tokens, s.min_new_tokens, s.batch_size) == (18, 5, 16)
    assert paper.task.fewshot_examples == 3 and paper.task.tool_max_operands == 2
    assert isinstance(ArithmeticTask, type)


def _brute_force_subtb(policy, reward, prompt, reward_prompt, answer, term, bias, row, mask,
                       floor_until, floor, temp, lam):
    """One row's SubTB numerator and denominator in float64 from full forward passes: the
    states are the prefixes before each action and the whole row (found here from the mask
    by hand, not by ``state_positions``); tool tokens have no log_pf."""
    m = copy.deepcopy(policy).double()
    seq = torch.tensor([list(prompt) + list(row)])
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=seq).logits[0].double() + bias.double(), -1)
    P = len(prompt)
    states = [j for j, a in enumerate(mask) if a] + [len(row)]
    pf = [float(logp[P - 1 + j, row[j]]) for j in states[:-1]]
    pterm = [float(logp[P - 1 + j, term]) for j in states]
    log_r = []
    for t, j in enumerate(states):
        r = (brute_force_log_reward(reward, reward_prompt, row[:j], term, bias)
             + brute_force_answer(reward, reward_prompt, row[:j], term, answer))
        log_r.append((floor if t < floor_until else r) / temp)
    num = den = 0.0
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            res = log_r[i] + sum(pf[i:j]) + pterm[j] - log_r[j] - pterm[i]
            num += lam ** (j - i - 1) * res ** 2
            den += lam ** (j - i - 1)
    return num, den


def test_loss_of_a_hand_built_batch_equals_float64_brute_force(tmp_path):
    """The trainer's loss on a hand-built batch of rows with calculator results (tool tokens
    in the middle, at the end, none) equals modified SubTB over the actions only, computed
    in float64 from full forward passes: log_pf of actions, log q(STOP) and the reward
    (few-shot prefix, vocabulary bias, answer) at every state, the floor reward below
    min_new_tokens, the reward temperature."""
    from fastgfn.trainer.batches import Batch

    tr = Trainer(load_config(CONFIG, TINY + [
        "tool=calculator", "fewshot_examples=1", "loss=subtb", "subtb_lambda=0.9",
        "initial_flow=policy", "min_new_tokens=2", "min_length_log_reward=-7.5",
        "reward_temperature=1.5", "eval_questions=0", f"output_dir={tmp_path}"]))
    task, tok = tr.task, tr.tokenizer
    rows, masks = zip(*(_with_tool(tok, task.tool(), t)
                        for t in [" 6-0=, 6-4=", "", " 9+8= x", " 1+1"]))
    W = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), W, dtype=torch.long)
    mask = torch.zeros(len(rows), W, dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        tokens[b, : len(r)], mask[b, : len(m)] = torch.tensor(r, dtype=torch.long), \
            torch.tensor(m)
    p = 3
    batch = Batch(p, tokens, torch.tensor([len(r) for r in rows]), [list(r) for r in rows],
                  True, mask)
    tr.batches.next_batch = lambda: batch
    want_num = want_den = 0.0
    for r, m in zip(rows, masks):
        num, den = _brute_force_subtb(
            tr.engine.module, task.reward_model, task.prompt_tokens(p).tolist(),
            task.reward_prompt_tokens(p).tolist(), task.answer_tokens(p).tolist(),
            task.termination_token_id, task.policy_logit_bias(), list(r), m, 2, -7.5, 1.5,
            0.9)
        want_num, want_den = want_num + num, want_den + den
    metrics = tr._micro_step()
    assert metrics["loss"] == pytest.approx(want_num / want_den, rel=1e-4)
    assert metrics["length"] == pytest.approx(sum(m.count(True) for m in masks) / len(rows))
    # the same rows read as all actions give another loss: the mask matters
    batch.action_mask = None
    batch.__post_init__()
    assert abs(tr._micro_step()["loss"] - metrics["loss"]) > 1e-3


ACTIONS = "1+=,"  # the policy's whole vocabulary in the test below (and the termination token)


def _every_rationale(tok, calc, max_actions: int):
    """Every rationale of 0..max_actions actions over ``ACTIONS`` as the sampler makes it (tool
    results after each "=" of a well-formed step): ``(tokens, action mask, at the limit)``."""
    out = []
    for n in range(max_actions + 1):
        for acts in itertools.product(ACTIONS, repeat=n):
            row, mask = _with_tool(tok, calc, "".join(acts))
            out.append((row, mask, n == max_actions))
    return out


def _exact_kls(tr, max_actions: int, temp: float):
    """``(KL(q || p), KL(p || q), target mass of rows with tool results)`` over every
    rationale: q the sampler's distribution (a forced end at the limit), p the target
    R^(1/temp) normalised."""
    task = tr.task
    R = _every_rationale(tr.tokenizer, task.tool(), max_actions)
    W = max(len(r) for r, _, _ in R)
    tokens = torch.zeros(len(R), W, dtype=torch.long)
    mask = torch.zeros(len(R), W, dtype=torch.bool)
    for b, (r, m, _) in enumerate(R):
        tokens[b, : len(r)], mask[b, : len(m)] = torch.tensor(r), torch.tensor(m)
    states, n = state_positions(mask, torch.tensor([len(r) for r, _, _ in R]))
    full = torch.tensor([f for _, _, f in R])
    with eval_mode(tr.engine.module) as model, torch.no_grad():
        pf, pt = gfn_logprobs(model, task.prompt_tokens(0), tokens, task.termination_token_id,
                              vocab_bias=task.policy_logit_bias(), states=states)
    pf, pt = pf.double(), pt.double()
    act = torch.arange(pf.shape[1])[None] < n[:, None]
    end = torch.where(full, 0.0, pt.gather(1, n[:, None]).squeeze(1))
    log_q = (pf * act).sum(1) + end
    log_r = task.state_log_rewards(0, [r for r, _, _ in R], W, states).double()
    log_p = log_r.gather(1, n[:, None]).squeeze(1) / temp
    log_p = log_p - torch.logsumexp(log_p, 0)
    assert abs(float(log_q.exp().sum()) - 1.0) < 1e-4  # the enumeration is complete
    with_tool = torch.tensor([not all(m) for _, m, _ in R])
    return (float((log_q.exp() * (log_q - log_p)).sum()),
            float((log_p.exp() * (log_p - log_q)).sum()), float(log_p.exp()[with_tool].sum()))


@pytest.fixture(scope="module")
def taught_compact():
    """The tiny model taught the format without spaces, "1+1= 2,2+3= 5." (arith_tiny.py)."""
    return pretrained_state(compact=True)


def test_training_with_the_tool_matches_the_exact_target(tmp_path, taught_compact,
                                                         monkeypatch):
    """600 steps on the question "1+1=?", the policy's logits restricted to "1+=," and STOP
    and to 5 actions (1365 rationales, the calculator's result after "1+1=" and the like):
    the exact KLs between the sampler's distribution and the target fall by more than 5x and
    10x (measured 2.41 -> 0.23 and 4.43 -> 0.06), and the rationales with a calculator result
    hold a tenth of the target's mass. (min_new_tokens=0: with the floor reward at s_0, the
    policy's own flow of s_0 cannot go below the floor, and this tiny model's rewards are
    near -115.)"""
    patch_build_tiny(taught_compact, monkeypatch.setattr)

    def only_actions(self):  # the policy's logits only: the reward keeps the task's bias
        bias = torch.full((self.vocab_size(),), -99.0)
        bias[[self.tokenizer.encode(c)[0] for c in ACTIONS]] = 0.0
        bias[self.termination_token_id] = 0.0
        return bias

    monkeypatch.setattr(ArithmeticTask, "policy_logit_bias", only_actions)
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"str_query": "Question: 1+1=? Answer:", "num_sol": 2}]))
    tr = Trainer(load_config(CONFIG, TINY + [
        "tool=calculator", "fewshot_examples=0", f"data_path={one}", "batch_size=8",
        "max_new_tokens=5", "min_new_tokens=0", "steps=600", "lr=1e-3", "warmup_steps=0",
        "reward_temperature=1.0", "reward_temperature_end=null", "eval_questions=0",
        "replay_prob=0.25", "explore_prob=0.5", "replay_seed=false",
        f"output_dir={tmp_path / 'run'}"]))
    kl, rkl, tool_mass = _exact_kls(tr, 5, 1.0)
    assert tool_mass > 0.05  # rationales with calculator results matter in the target
    tr.run()
    kl2, rkl2, _ = _exact_kls(tr, 5, 1.0)
    assert kl2 < kl / 5 and rkl2 < rkl / 10, (kl, kl2, rkl, rkl2)
