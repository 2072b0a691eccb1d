"""End-to-end training on a tiny random model: runs, resumes bit-for-bit, exports, handles
SIGTERM. Each test takes seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgfn.train import main
from fastgfn.trainer import Trainer, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny",
    "tiny_hidden=32",
    "batch_size=8",
    "max_new_tokens=3",
    "progress=false",
    "eval_samples=0",
    "tensorboard=false",
    "replay_prob=0.5",
    "explore_prob=0.5",
]


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_run_logs_metrics(tmp_path):
    cfg = load_config(
        None,
        TINY
        + ["steps=3", f"output_dir={tmp_path}", "eval_samples=32", "eval_batch_size=16", "loss=tb"],
    )
    res = Trainer(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for x in steps:
        for key in ("loss", "log_z", "log_reward", "length", "tokens_per_s", "peak_memory_mb"):
            assert key in x
    assert steps[-1]["log_z"] != 0.0  # log Z is learned with TB
    assert res["after"]["samples"] == 32 and "valid_fraction" in res["after"]
    assert (tmp_path / "histogram.png").is_file()
    # every run ends with the fine-tuned model as a Hugging Face directory
    assert res["model_dir"] == str(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_save_model_false_saves_no_model(tmp_path):
    cfg = load_config(None, TINY + ["steps=1", f"output_dir={tmp_path}", "save_model=false"])
    assert "model_dir" not in Trainer(cfg).run()
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("loss", ["subtb", "vargrad", "db"])
def test_losses_change_parameters(tmp_path, loss):
    cfg = load_config(
        None,
        TINY + ["steps=2", f"output_dir={tmp_path}", f"loss={loss}", "lr=1e-2", "warmup_steps=0"],
    )
    tr = Trainer(cfg)
    before = _params(tr.engine.module)
    tr.run()
    after = _params(tr.engine.module)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_matches_uninterrupted(tmp_path):
    common = TINY + ["save_every=2", "lr=1e-3", "warmup_steps=3", "loss=tb"]
    full = Trainer(load_config(None, common + ["steps=6", f"output_dir={tmp_path / 'a'}"]))
    full.run()
    part = Trainer(
        load_config(
            None, common + ["steps=6", "stop_after_steps=4", f"output_dir={tmp_path / 'b'}"]
        )
    )
    assert part.run().get("interrupted")
    resumed = Trainer(
        load_config(None, common + ["steps=6", f"output_dir={tmp_path / 'b'}", "resume=true"])
    )
    assert resumed.maybe_resume() and resumed.step == 4
    resumed.cfg.run.resume = False  # already loaded
    resumed.run()
    a, b = _params(full.engine.module), _params(resumed.engine.module)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert full.objective.log_z.value() == resumed.objective.log_z.value()
    assert full.buffer.entries == resumed.buffer.entries
    # a different seed really gives different parameters (the comparison can fail)
    other = Trainer(
        load_config(None, common + ["steps=6", "seed=1", f"output_dir={tmp_path / 'c'}"])
    )
    other.run()
    c = _params(other.engine.module)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_atomic_latest(tmp_path):
    from fastgfn.trainer.persistence.checkpoint import latest_checkpoint

    cfg = load_config(
        None, TINY + ["steps=4", "save_every=1", "keep_checkpoints=2", f"output_dir={tmp_path}"]
    )
    Trainer(cfg).run()
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000004"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert not list(root.glob(".tmp-*"))
    state = json.loads((root / "step_00000004" / "client_state.json").read_text())
    assert state["step"] == 4 and "entries" in state["buffer"]
    # a half-written checkpoint (no rename, no latest update) is never taken
    (root / ".tmp-step_00000009").mkdir()
    assert latest_checkpoint(root).name == "step_00000004"


def test_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    cfg = load_config(None, TINY + ["steps=1", f"output_dir={tmp_path}", f"export_dir={out}"])
    tr = Trainer(cfg)
    tr.run()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tr.engine.module.eval()(ids).logits)


def test_bad_config_exits_with_message(capsys):
    assert main(["model=tiny", "steps=-1"]) == 2
    assert "steps" in capsys.readouterr().err


def test_sigterm_saves_and_exits(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "fastgfn.train", *TINY, "steps=100000", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert b"saved" in out
    from fastgfn.trainer.persistence.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None
    step = json.loads((ckpt / "client_state.json").read_text())["step"]
    assert 1 <= step < 100000


@pytest.mark.parametrize("lora", [False, True])
def test_continuation_task_with_frozen_reward(tmp_path, lora):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sky is blue.\nA cat sat on the mat.\n")
    cfg = load_config(
        None,
        TINY
        + [
            "task=continuation",
            f"data_path={prompts}",
            "termination=.",
            "steps=2",
            "max_new_tokens=5",
            f"lora={lora}",
            f"output_dir={tmp_path / 'out'}",
            "eval_samples=8",
            "eval_batch_size=4",
            "lr=1e-2",
            "warmup_steps=0",
        ],
    )
    tr = Trainer(cfg)
    policy = tr.engine.module
    trainable = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
    if lora:
        assert all("lora_" in k for k in trainable)
    rows = [[5, 6, 7], [8]]
    r0 = tr.task.log_rewards(0, rows, 3)
    res = tr.run()
    assert res["after"]["samples"] == 8
    changed = any(
        not torch.equal(v, dict(policy.named_parameters())[k]) for k, v in trainable.items()
    )
    assert changed
    # the reward model stayed frozen (LoRA: adapters disabled give the initial model)
    torch.testing.assert_close(tr.task.log_rewards(0, rows, 3), r0)
    assert r0.shape == (2, 4) and (r0 <= 0).all()
