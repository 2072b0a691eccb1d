"""The arithmetic task's baselines on the tiny model: the SFT examples (rationales as the
sampler with the calculator makes them, the calculator's tokens masked from the loss) and the
command that trains on them; the RL baseline (TRL's GRPOTrainer with fastgfn's sampler and
calculator as its rollout function): the calculator's tokens reach TRL's loss masked, the
reward is the task's log-reward, a short run raises it, and the evaluation command reads
both models."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")  # the optional [trl] extra

from fastgfn.trainer import load_config  # noqa: E402
from fastgfn.trainer.integrations.tiny import char_tokenizer_fast  # noqa: E402
from fastgfn.trainer.model.reward import RewardLM  # noqa: E402
from fastgfn.trainer.tasks import build_task  # noqa: E402
from fastgfn.trainer.tasks.arithmetic import sft_pairs  # noqa: E402
from fastgfn.trainer.tools.calculator import CalculatorTool, complete_rationale  # noqa: E402

from .arith_tiny import patch_build_tiny, pretrained_state  # noqa: E402

CONFIG = "configs/arithmetic.yaml"
TINY = ["model=tiny", "tiny_hidden=32", "num_threads=1"]


def test_sft_pairs_are_what_the_sampler_makes():
    """Each completion is the worked rationale with the calculator's results and the
    termination token; feeding its loss tokens (the actions) to the calculator one by one
    gives back exactly the completion, the masked tokens being the calculator's."""
    cfg = load_config(CONFIG, TINY)
    tok = char_tokenizer_fast()
    calc = CalculatorTool(tok)
    items = json.loads(Path(cfg.task.data_path).read_text())
    pairs = sft_pairs(cfg, tok)
    assert len(pairs) == 50
    for (prompt, completion, mask), item in zip(pairs, items):
        assert tok.decode(prompt) == item["str_query"]
        assert tok.decode(completion) == " " + complete_rationale(item["str_rationale"]) + "."
        row, made = [], []
        for t, m in zip(completion, mask):
            if m:
                row.append(t)
                made.append(1)
                if t in calc.trigger_ids:
                    result = calc.call(row)
                    row += result
                    made += [0] * len(result)
        assert row == completion and made == mask
        assert mask.count(0) > 0


def test_sft_pairs_need_rationales(tmp_path):
    from fastgfn.trainer import ConfigError

    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"str_query": "Q", "num_sol": 1}]))
    cfg = load_config(CONFIG, TINY + [f"data_path={data}", "fewshot_examples=0"])
    with pytest.raises(ConfigError, match="item 0 has no field 'str_rationale'"):
        sft_pairs(cfg, char_tokenizer_fast())


@pytest.fixture(scope="module")
def compact():
    return pretrained_state(compact=True)


def _one_question(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"str_query": "Question: 1+1=? Answer:", "num_sol": 2},
                                {"str_query": "Question: 2+3=? Answer:", "num_sol": 5}]))
    return [f"data_path={path}", "fewshot_examples=0", "max_new_tokens=6",
            "min_new_tokens=0"]


def _grpo(tmp_path, data, steps, lr=1e-5):
    from fastgfn.trainer.baselines.rl import grpo_config, grpo_trainer
    from fastgfn.trainer.model.loading import load_model

    cfg = load_config(CONFIG, TINY + data)
    model, tok = load_model(cfg)
    reward, _ = load_model(cfg)
    task = build_task(cfg, tok, RewardLM(reward.eval()))
    args = grpo_config(tmp_path / "rl", max_steps=steps, learning_rate=lr, num_generations=8,
                       per_device_train_batch_size=8, seed=0, lr_scheduler_type="constant")
    return grpo_trainer(model, char_tokenizer_fast(), task, args, max_new_tokens=6), task


def test_rl_masks_the_calculator_tokens_in_trls_loss(tmp_path, compact, monkeypatch):
    """What TRL's loss sees: the completions are the sampler's rows (and the termination
    token), its tool_mask is 0 exactly at the calculator's tokens, and the rewards are the
    task's log-rewards of the whole rationales."""
    patch_build_tiny(compact, monkeypatch.setattr)
    trainer, task = _grpo(tmp_path, _one_question(tmp_path), steps=2)
    seen = []
    real_loss = type(trainer).compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items()
                     if isinstance(v, torch.Tensor)})
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(type(trainer), "compute_loss", compute_loss)
    rollouts = trainer.rollout_func
    real_call = rollouts.__call__
    outs = []

    def call(prompts, tr):
        out = real_call(prompts, tr)
        outs.append(out)
        return out

    trainer.rollout_func = call
    trainer.train()
    assert seen and outs
    tool_tokens = 0
    for out in outs:
        for comp, mask, row in zip(out["completion_ids"], out["env_mask"], out["rationale"]):
            assert comp[: len(row)] == row and len(mask) == len(comp)
            tool_tokens += mask.count(0)
            expected = _calculator_tokens(task.tool(), row)
            assert [j for j, m in enumerate(mask) if m == 0] == expected
    assert tool_tokens > 0
    # TRL's loss inputs (its batch order): each row's tool mask is its rollout's env_mask
    made = {tuple(c): m for out in outs for c, m in zip(out["completion_ids"], out["env_mask"])}
    for inputs in seen:
        ids, tmask = inputs["completion_ids"], inputs["tool_mask"]
        for b, L in enumerate(inputs["completion_mask"].sum(1).tolist()):
            assert tmask[b, :L].tolist() == made[tuple(ids[b, :L].tolist())]


def _calculator_tokens(calc, row):
    """Positions in ``row`` that the calculator wrote, found by replaying it."""
    out, built, j = [], [], 0
    while j < len(row):
        built.append(row[j])
        j += 1
        if built[-1] in calc.trigger_ids:
            result = calc.call(built)
            assert row[j: j + len(result)] == result
            out += list(range(j, j + len(result)))
            built += result
            j += len(result)
    return out


def test_rl_reward_is_the_task_log_reward(tmp_path, compact, monkeypatch):
    from fastgfn.trainer.baselines.rl import log_reward_function

    patch_build_tiny(compact, monkeypatch.setattr)
    trainer, task = _grpo(tmp_path, _one_question(tmp_path), steps=1)
    tok = task.tokenizer
    rows = [tok.encode(t) for t in ["1+1= 2", "", "1,1", "2+3= 5,5"]]
    qs = [0, 0, 1, 1]
    got = log_reward_function(task)(None, None, qs, rows)
    for g, q, r in zip(got, qs, rows):
        want = task.log_rewards(q, [r], len(r))[0, len(r)]
        assert g == pytest.approx(float(want), abs=1e-5)


def test_rl_raises_the_reward(tmp_path):
    """30 GRPO steps at lr 3e-3 on the random tiny model raise the mean log-reward of the
    sampled rationales by more than 5 nats (measured -94 -> -83: it learns to stop at once,
    the reward's maximum; the taught model samples that from the start)."""
    trainer, _ = _grpo(tmp_path, _one_question(tmp_path), steps=30, lr=3e-3)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 30 and all(math.isfinite(r) for r in rewards)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 5.0, (first, last)


def test_baseline_commands_and_the_evaluation(tmp_path, compact, monkeypatch, capsys):
    """The SFT and RL commands on the tiny model write loadable models that the evaluation
    command scores beside the few-shot baseline."""
    from fastgfn.trainer.baselines.rl import main as rl_main
    from fastgfn.trainer.baselines.sft import main as sft_main
    from fastgfn.trainer.evaluation.arithmetic.cli import main as eval_main

    patch_build_tiny(compact, monkeypatch.setattr)
    sft_main(["--config", CONFIG, "--out", str(tmp_path / "sft"), "--epochs", "1",
              "--batch_size", "10"] + TINY)
    sft = json.loads((tmp_path / "sft" / "sft.json").read_text())
    assert sft["examples"] == 50 and sft["steps"] == 5 and math.isfinite(sft["last_loss"])
    rl_main(["--config", CONFIG, "--out", str(tmp_path / "rl"), "--steps", "2",
             "--generations", "4"] + TINY + ["max_new_tokens=8"])
    rl = json.loads((tmp_path / "rl" / "rl.json").read_text())
    assert rl["steps"] == 2 and len(rl["rewards"]) == 2
    eval_main(["--config", CONFIG, "--policy", f"sft={tmp_path / 'sft' / 'model'}",
               "--policy", f"rl={tmp_path / 'rl' / 'model'}", "--limit", "2", "--k", "2",
               "--max_new_tokens", "6", "--out", str(tmp_path / "eval")] + TINY)
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    for methods in report["results"].values():
        assert list(methods) == ["few-shot (base LM)", "sft", "rl"]
