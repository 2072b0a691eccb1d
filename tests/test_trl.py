"""The TRL integration (``fastgfn.trainer.integrations.trl``) on a tiny random Llama on the CPU:
it trains with a reward callable in TRL's convention, its loss on a batch is fastgfn's loss
of that batch (recomputed here through the engine's scoring path and the library's losses),
the random-number task trained through it moves toward uniform as the native engine does,
its checkpoints carry log Z and the replay buffer, and bad arguments are named."""

import json
import math
import re

import pytest
import torch

pytest.importorskip("trl")  # the optional [trl] extra

from datasets import Dataset  # noqa: E402

import fastgfn  # noqa: E402
from fastgfn.trainer import Trainer, load_config  # noqa: E402
from fastgfn.trainer.integrations.tiny import tiny_causal_lm  # noqa: E402
from fastgfn.trainer.integrations.trl import GFNConfig, GFNTrainer  # noqa: E402
from fastgfn.trainer.scoring import gfn_logprobs  # noqa: E402

PROMPTS = ["n: ", "pick one: "]  # two lengths: the batch pads prompts on the left
CANONICAL = re.compile(r"0|[1-9][0-9]*")


def number_reward(high: int = 100):
    """The random-number task's log-reward in TRL's convention: 0 for an integer in
    [0, high] written canonically, -20 otherwise."""

    def valid_number(completions, **kwargs):
        return [0.0 if CANONICAL.fullmatch(c) and int(c) <= high else -20.0 for c in completions]

    return valid_number


def gfn_args(tmp_path, **overrides) -> GFNConfig:
    values = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8,
                  num_generations=4, max_completion_length=3, termination=",", bf16=False,
                  gradient_checkpointing=False, report_to="none", save_strategy="no",
                  use_cpu=True, disable_tqdm=True, logging_steps=1, learning_rate=1e-2)
    values.update(overrides)
    return GFNConfig(**values)


def trainer_for(tmp_path, reward=None, prompts=PROMPTS, n=8, **overrides) -> GFNTrainer:
    model, tok = tiny_causal_lm()
    data = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(n)],
                              "hint": [f"row {i}" for i in range(n)]})
    return GFNTrainer(model, reward or number_reward(), args=gfn_args(tmp_path, **overrides),
                      train_dataset=data, processing_class=tok)


def test_trains_steps_with_a_reward_callable(tmp_path):
    seen = []

    def reward(prompts, completions, completion_ids, trainer_state, hint, **kwargs):
        seen.append((list(prompts), list(hint), trainer_state.global_step))
        assert len(completions) == len(completion_ids) == len(hint)
        return number_reward()(completions)

    tr = trainer_for(tmp_path, reward, loss="tb", max_steps=3)
    tr.train()
    steps = [h for h in tr.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    for h in steps:
        for key in ("loss", "log_reward", "log_z", "length", "replayed", "step_s"):
            assert math.isfinite(h[key]), key
    assert tr.objective.log_z.value() != 0.0  # TB's log Z learns, through its own Adam
    assert [s[2] for s in seen] == [0, 1, 2]  # one reward call per step (TB: completions only)
    prompts, hints, _ = seen[0]
    assert set(prompts) <= set(PROMPTS) and all(h.startswith("row ") for h in hints)


def _reference_loss(tr, batch, loss: str, log_z: float, temperature: float):
    """fastgfn's loss of the same rows, recomputed independently: log-probs through the
    engine's scoring (each group's prompt unpadded, run once), rewards by calling the reward
    function on every decoded prefix, the stop forced at the length limit, then the library's
    loss functions."""
    tok, P, G = tr.processing_class, batch["prompt_len"], tr.args.num_generations
    lengths = batch["lengths"].cpu()
    tokens = batch["input_ids"][:, P:].cpu()
    log_pf, log_pterm = [], []
    for g in range(len(lengths) // G):
        ids = batch["input_ids"][g * G, :P][batch["attention_mask"][g * G, :P].bool()]
        a, b = gfn_logprobs(tr.model, ids, tokens[g * G:(g + 1) * G], tr.termination_token_id)
        log_pf.append(a)
        log_pterm.append(b)
    log_pf, log_pterm = torch.cat(log_pf), torch.cat(log_pterm)
    # a row of max_completion_length tokens was stopped by the limit: P(STOP) = 1 there
    full = lengths == tr.args.max_completion_length
    log_pterm[full, lengths[full]] = 0.0
    reward = number_reward()
    log_r = torch.zeros(log_pterm.shape)
    for b in range(len(lengths)):
        texts = [tok.decode(tokens[b, :t].tolist()) for t in range(int(lengths[b]) + 1)]
        log_r[b, :len(texts)] = torch.tensor(reward(texts))
    log_r = log_r / temperature
    if loss == "vargrad":
        groups = torch.arange(len(lengths)) // G
        return fastgfn.vargrad_loss(log_pf, log_pterm, log_r, lengths, groups)
    if loss == "tb":
        return fastgfn.tb_loss(log_pf, log_pterm, log_r, lengths, torch.tensor(log_z))
    # two prompts, min_completion_length=1: s0 cannot stop; it keeps the policy's own
    # q(STOP | s0) and gets the floor log-reward -99 (tempered), as in the engine
    log_r = torch.cat([torch.full_like(log_r[:, :1], -99.0 / temperature), log_r[:, 1:]], 1)
    if loss == "db":
        return fastgfn.db_loss(log_pf, log_pterm, log_r, lengths)
    return fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths, lam=0.9)


@pytest.mark.parametrize("loss", ["vargrad", "tb", "subtb", "db"])
def test_loss_equals_fastgfn_loss_on_the_same_batch(tmp_path, loss):
    digits = tiny_causal_lm()[1].convert_tokens_to_ids(list("0123456789"))
    tr = trainer_for(tmp_path, loss=loss, log_z_init=0.3, subtb_lambda=0.9,
                     reward_temperature=2.0, explore_prob=1.0, explore_temp_high=3.0,
                     explore_vocab_ids=digits, explore_vocab_prob=1.0, max_completion_length=5)
    tr.model.train()
    rows = [{"prompt": PROMPTS[i // 4], "hint": "h"} for i in range(8)]
    batch = tr._prepare_inputs(rows)
    assert len(set(batch["lengths"].tolist())) > 1  # mixed lengths, padded
    got = tr.compute_loss(tr.model, batch)
    want = _reference_loss(tr, batch, loss, 0.3, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()  # through the model's own forward (the one DDP/DeepSpeed wrap)
    assert tr.model.get_input_embeddings().weight.grad.abs().sum() > 0


@torch.no_grad()
def kl_uniform_to_policy(model, tok, prompt: str, high: int) -> float:
    """KL(uniform over the valid values || the policy's distribution over completions), from
    one teacher-forced pass over all valid values through ``fastgfn.causal_lm_gfn_logprobs``
    (termination forbidden at s0, as in sampling). Falls to 0 as the policy puts all its
    mass, evenly, on the valid values."""
    term = tok.convert_tokens_to_ids(",")
    p = tok(prompt)["input_ids"]
    rows = [tok(str(v))["input_ids"] for v in range(high + 1)]
    width = max(map(len, rows))
    ids = torch.tensor([p + r + [0] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    was = model.training
    model.eval()
    log_pf, log_pterm = fastgfn.causal_lm_gfn_logprobs(model, ids, len(p), term)
    model.train(was)
    mask = torch.arange(width)[None] < lengths[:, None]
    log_q = (log_pf * mask).sum(1) + log_pterm.gather(1, lengths[:, None])[:, 0]
    log_q = log_q - torch.log1p(-log_pterm[0, 0].exp())
    return float(-math.log(high + 1) - log_q.mean())


def test_random_number_moves_toward_uniform_as_the_native_engine_does(tmp_path):
    steps, lr, high, prompt = 25, 1e-2, 9, "n: "
    common = dict(loss="subtb", batch=16, replay=0.0)
    native = Trainer(load_config(None, [
        "model=tiny", "tiny_hidden=32", f"batch_size={common['batch']}", "max_new_tokens=2",
        f"task_high={high}", f"prompt={prompt}", f"loss={common['loss']}", f"steps={steps}",
        f"lr={lr}", "warmup_steps=0", "lr_schedule=constant", "dead_ends=false",
        f"replay_prob={common['replay']}", "sample_dtype=model", "eval_samples=0",
        "progress=false", "save_model=false", "tensorboard=false",
        f"output_dir={tmp_path / 'native'}"]))
    model, tok = tiny_causal_lm()
    start = kl_uniform_to_policy(model, tok, prompt, high)
    assert start == pytest.approx(kl_uniform_to_policy(native.engine.module, tok, prompt, high))
    native.run()
    args = gfn_args(tmp_path, loss=common["loss"], per_device_train_batch_size=common["batch"],
                    num_generations=common["batch"], max_completion_length=2, max_steps=steps,
                    learning_rate=lr, lr_scheduler_type="constant", logging_steps=5,
                    replay_prob=common["replay"],
                    explore_vocab_ids=tok.convert_tokens_to_ids(list("0123456789")))
    GFNTrainer(model, number_reward(high), args=args, processing_class=tok,
               train_dataset=Dataset.from_dict({"prompt": [prompt] * steps})).train()
    kl_native = kl_uniform_to_policy(native.engine.module, tok, prompt, high)
    kl_trl = kl_uniform_to_policy(model, tok, prompt, high)
    print(f"KL(uniform || policy): start {start:.3f}, native {kl_native:.3f}, trl {kl_trl:.3f}")
    assert start > 5.0  # the random policy puts about 1e-3 of its mass on the valid values
    assert kl_native < start / 4 and kl_trl < start / 4


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    """log Z (with its Adam state), the replay buffer and the sampling streams are saved
    beside TRL's checkpoint and restored on resume: the resumed run ends where the
    uninterrupted one does."""
    full = trainer_for(tmp_path, loss="tb", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    ckpt = tmp_path / "trl" / "checkpoint-2"
    state = json.loads((ckpt / "fastgfn_state.json").read_text())
    assert set(state) == {"objective", "buffer", "prompts", "generator", "py_rng"}
    assert "GFlowNet" in (tmp_path / "trl" / "README.md").read_text()  # TRL's model card
    resumed = trainer_for(tmp_path, loss="tb", max_steps=4, output_dir=str(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.objective.log_z.value() == full.objective.log_z.value() != 0.0
    assert resumed.buffer.state_dict() == full.buffer.state_dict() and len(full.buffer) > 0
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="^loss:"):
        gfn_args(tmp_path, loss="ppo")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        gfn_args(tmp_path, per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="num_generations"):
        gfn_args(tmp_path, num_generations=1, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="explore_prob"):
        gfn_args(tmp_path, explore_prob=1.5)
    with pytest.raises(TypeError, match=r"reward_funcs\[0\]"):
        trainer_for(tmp_path, reward="some/reward-model")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        model, tok = tiny_causal_lm()
        GFNTrainer(model, number_reward(), args=gfn_args(tmp_path), processing_class=tok,
                   train_dataset=Dataset.from_dict({"text": ["a"]}))
    tr = trainer_for(tmp_path, reward=lambda completions, **kw: [0.0])
    tr.model.train()
    with pytest.raises(ValueError, match="returned 1 rewards for 8 completions"):
        tr._prepare_inputs([{"prompt": "n: ", "hint": ""}] * 8)


def test_conversational_prompts_get_the_chat_template(tmp_path):
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [0.0] * len(completions)

    model, tok = tiny_causal_lm()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    chat = [{"role": "user", "content": "a number?"}]
    tr = GFNTrainer(model, reward, args=gfn_args(tmp_path), processing_class=tok,
                    train_dataset=Dataset.from_dict({"prompt": [chat] * 2}))
    tr.model.train()
    batch = tr._prepare_inputs([{"prompt": chat}] * 8)
    prompt = tok.decode(batch["input_ids"][0, :batch["prompt_len"]].tolist())
    assert prompt == "user: a number?\nassistant: "
    assert seen["prompt"] == chat and seen["completion"][0]["role"] == "assistant"
    assert isinstance(seen["completion"][0]["content"], str)
