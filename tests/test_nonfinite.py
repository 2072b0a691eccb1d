"""Never train on NaN: a step whose rewards, loss or gradient norm are not finite is skipped
(parameters, optimizer moments and log Z bit-equal to before), counted and logged; the rows are
reported and kept out of the replay buffer; too many skipped steps in a row stop the run with
one line; non-finite config values are refused at load."""

import json
import math

import pytest
import torch

from fastgfn.train import main
from fastgfn.trainer import ConfigError, Trainer, TrainingError, load_config
from tests.test_train import TINY, _params

ARGS = TINY + ["lr=1e-2", "warmup_steps=0", "loss=tb", "save_model=false"]


def _poison(task, steps: set[int], value: float, rows=(1, 3), tr=None):
    """Make ``task.log_rewards`` return ``value`` for ``rows`` during the given steps."""
    real = task.log_rewards

    def log_rewards(prompt_index, batch_rows, T):
        out = real(prompt_index, batch_rows, T)
        if tr.step + 1 in steps:
            out[list(rows), 0] = value  # prefix 0: read by the loss for every row
        return out

    task.log_rewards = log_rewards


def _optimizer_state(tr):
    return {i: {k: v.clone() for k, v in s.items()}
            for i, s in enumerate(tr.engine.optimizer.state.values())}


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_reward_skips_the_step_exactly(tmp_path, capsys, value):
    tr = Trainer(load_config(None, ARGS + ["steps=3", "replay_prob=0", f"output_dir={tmp_path}"]))
    _poison(tr.task, {2}, value, tr=tr)
    m1 = tr.train_step()
    tr.step = 1
    params, opt = _params(tr.engine.module), _optimizer_state(tr)
    log_z_param = tr.objective.log_z.param
    log_z = log_z_param.detach().clone()
    log_z_adam = {k: v.clone() for k, v in tr.objective.log_z.opt.state[log_z_param].items()}
    buffer = json.dumps(tr.buffer.state_dict())
    m2 = tr.train_step()
    assert m1["skipped"] == 0 and m2["skipped"] == 1 and not math.isfinite(m2["grad_norm"])
    for k, v in _params(tr.engine.module).items():
        assert torch.equal(v, params[k]), k
    for i, s in _optimizer_state(tr).items():
        for k, v in s.items():
            assert torch.equal(v, opt[i][k]), (i, k)
    assert torch.equal(log_z_param.detach(), log_z)
    for k, v in tr.objective.log_z.opt.state[log_z_param].items():
        assert torch.equal(v, log_z_adam[k]), k
    # the batch's finite rows may enter the buffer, the poisoned ones never
    state = tr.buffer.state_dict()
    assert all(math.isfinite(lr) for v in state["entries"].values() for lr, _ in v)
    assert len(json.dumps(state)) >= len(buffer)
    said = capsys.readouterr().out
    assert "step 2: non-finite reward from task 'random_number', prompt 0" in said
    assert "row 1 " in said and "row 3 " in said and "skipped" in said
    tr.step = 2
    m3 = tr.train_step()  # training goes on
    assert m3["skipped"] == 0 and any(
        not torch.equal(v, params[k]) for k, v in _params(tr.engine.module).items())


def test_skipped_steps_are_counted_logged_and_checkpointed(tmp_path):
    cfg = load_config(None, ARGS + ["steps=5", "save_every=5", f"output_dir={tmp_path}"])
    tr = Trainer(cfg)
    _poison(tr.task, {2, 4}, float("nan"), tr=tr)
    tr.run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["skipped"] for x in steps] == [0, 1, 0, 1, 0]
    assert [x["skipped_steps"] for x in steps] == [0, 1, 1, 2, 2]
    assert all(torch.isfinite(v).all() for v in _params(tr.engine.module).values())
    assert math.isfinite(tr.objective.log_z.value())
    client = json.loads((tmp_path / "checkpoints" / "step_00000005" / "client_state.json")
                        .read_text())
    assert client["skipped_steps"] == 2
    assert all(math.isfinite(lr) for v in client["buffer"]["entries"].values() for lr, _ in v)


def test_non_finite_loss_without_bad_rewards_is_skipped(tmp_path):
    """The gradient norm check catches what the reward check cannot see (here the loss)."""
    tr = Trainer(load_config(None, ARGS + ["steps=2", f"output_dir={tmp_path}"]))
    real = tr.objective.loss

    def infinite(*a):
        loss, flow = real(*a)
        return loss * float("inf"), flow

    tr.objective.loss = infinite
    params = _params(tr.engine.module)
    m = tr.train_step()
    assert m["skipped"] == 1
    assert all(torch.equal(v, params[k]) for k, v in _params(tr.engine.module).items())


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, capsys, monkeypatch):
    from fastgfn.trainer.tasks.random_number import RandomNumberTask

    real = RandomNumberTask.log_rewards
    monkeypatch.setattr(RandomNumberTask, "log_rewards",
                        lambda self, *a: real(self, *a) * float("nan"))
    args = [*ARGS, "steps=10", "max_nonfinite_steps=3", f"output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgfn: training error: 3 steps in a row")
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in steps if "loss" in x] == [1, 1, 1]
    with pytest.raises(TrainingError, match="max_nonfinite_steps=3"):
        Trainer(load_config(None, args[:-1] + [f"output_dir={tmp_path / 'b'}"])).run()


def test_log_z_auto_init_ignores_non_finite_rows(tmp_path):
    tr = Trainer(load_config(None, ARGS + ["steps=1", "log_z_auto_init=true",
                                           f"output_dir={tmp_path}"]))
    _poison(tr.task, {1}, float("nan"), tr=tr)
    tr.train_step()
    assert math.isfinite(tr.objective.log_z.value()) and tr.objective.log_z.value() != 0.0


@pytest.mark.parametrize("override, key", [
    ("lr=inf", "lr"), ("lr=nan", "lr"), ("grad_clip=nan", "grad_clip"),
    ("log_z_init=nan", "log_z_init"), ("log_z_init=inf", "log_z_init"),
    ("invalid_log_reward=nan", "invalid_log_reward"),
    ("invalid_log_reward=-inf", "invalid_log_reward"),
    ("reward_temperature=nan", "reward_temperature"),
    ("reward_temperature=inf", "reward_temperature"),
    ("reward_temperature_end=nan", "reward_temperature_end"),
    ("reward_temperature_end=inf", "reward_temperature_end"),
    ("lora_alpha=nan", "lora_alpha"),
    ("weight_decay=nan", "weight_decay"), ("log_z_lr=inf", "log_z_lr"),
    ("subtb_lambda=0", "subtb_lambda"), ("subtb_lambda=nan", "subtb_lambda"),
    ("max_nonfinite_steps=0", "max_nonfinite_steps"),
    ("explore_prob=nan", "explore_prob"), ("lr_min_ratio=nan", "lr_min_ratio"),
])
def test_non_finite_config_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        load_config(None, [override])


def test_non_finite_task_values_are_refused(tmp_path):
    """A task's own keys are checked by its options, for a task that has them."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    for value in ("-inf", "nan"):
        with pytest.raises(ConfigError, match=r"^illegal_token_bias: must be"):
            load_config(None, ["task=continuation", f"data_path={prompts}",
                               f"illegal_token_bias={value}"])


def test_the_skip_makes_no_host_read(tmp_path, monkeypatch):
    """The engine's step and log Z's step decide the skip on the device: no tensor is read on
    the host inside them (on CUDA such a read would be a sync per step). Python-level reads
    are made to fail while they run; the step is skipped all the same."""
    tr = Trainer(load_config(None, ARGS + ["steps=2", f"output_dir={tmp_path}"]))
    _poison(tr.task, {1}, float("nan"), tr=tr)
    for _ in range(tr.cfg.optimisation.grad_accum):
        tr._micro_step()
    params = _params(tr.engine.module)

    def no_read(*a, **k):
        raise AssertionError("host read of a tensor during the step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, no_read)
        norm, skipped = tr.engine.step()
        tr.objective.step(skipped)
    assert bool(skipped) and not math.isfinite(float(norm))
    assert all(torch.equal(v, params[k]) for k, v in _params(tr.engine.module).items())
