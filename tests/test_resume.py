"""Resume means the same run: a changed setting is applied or refused, never ignored while
being recorded; the client state and replay buffer read from a checkpoint are validated field
by field; overrides and flags go in any order on the command line."""

import json
import shutil

import pytest
import torch

from fastgfn.train import main, parse_args
from fastgfn.trainer import CheckpointError, Trainer
from fastgfn.trainer.persistence.checkpoint_files import write_marker
from fastgfn.trainer.persistence.resume import FIXED, FREE, check_client_state
from fastgfn.trainer.replay import ReplayBuffer
from tests.test_checkpoints import COMMON, _cfg, run6  # noqa: F401 (fixture)

STEP4 = "step_00000004"


def _at_step4(run6, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(run6[0], out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    return out


def test_cli_accepts_overrides_and_flags_in_any_order():
    args = parse_args(["steps=3", "--resume", "lr=1e-3", "--allow_config_change", "loss=tb"])
    assert args.resume and args.allow_config_change
    assert args.overrides == ["steps=3", "lr=1e-3", "loss=tb"]


@pytest.mark.parametrize("change", ["lr=1e-2", "batch_size=4", "loss=subtb", "dtype=bfloat16",
                                    "replay_size=2"])
def test_changed_setting_is_refused_with_the_differences(run6, tmp_path, capsys, change):  # noqa: F811
    out = _at_step4(run6, tmp_path)
    assert main([*COMMON, "steps=6", f"output_dir={out}", change, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = change.split("=")[0]
    assert len(err) == 1 and err[0].startswith("fastgfn: checkpoint error: resume: the config")
    assert f"{key}: " in err[0] and "--allow_config_change" in err[0]


def test_fixed_settings_are_refused_even_with_the_override(run6, tmp_path, capsys):  # noqa: F811
    out = _at_step4(run6, tmp_path)
    args = [*COMMON, "steps=6", f"output_dir={out}", "seed=5", "tiny_hidden=16", "--resume",
            "--allow_config_change"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot change on resume" in err and "seed: 0 -> 5" in err and "tiny_hidden" in err


def test_free_settings_apply_without_the_override(run6, tmp_path, capsys):  # noqa: F811
    out = _at_step4(run6, tmp_path)
    tr = Trainer(_cfg(out, "resume=true", "steps=8", "keep_checkpoints=5", "eval_every=3"))
    assert tr.maybe_resume() and tr.step == 4
    assert "resume: changed:" in capsys.readouterr().out
    tr.cfg.run.resume = False
    tr.run()
    assert tr.step == 8


def test_allowed_changes_are_applied_and_recorded(run6, tmp_path, capsys):  # noqa: F811
    """With the override: the new lr reaches the optimizer (the checkpoint's would come back
    otherwise), replay_size shrinks the buffer, log_z_init cannot apply and keeps the saved
    value, and the next checkpoint records what was in effect."""
    out = _at_step4(run6, tmp_path)
    tr = Trainer(_cfg(out, "resume=true", "allow_config_change=true", "lr=0.01", "weight_decay=0.1",
                      "replay_size=2", "log_z_init=3.0"))
    assert tr.maybe_resume() and tr.step == 4
    said = capsys.readouterr().out
    assert "applying" in said and "lr: 0.001 -> 0.01" in said and "replay_size: 128 -> 2" in said
    assert "not applied: log_z_init" in said
    from fastgfn.trainer.engines import lr_factor

    group = tr.engine.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.01 * lr_factor(4, tr.cfg.optimisation))
    assert group["weight_decay"] == 0.1
    assert tr.buffer.capacity == 2 and all(len(v) <= 2 for v in tr.buffer.entries.values())
    tr.cfg.run.resume = False
    tr.run()
    saved = json.loads((out / "checkpoints" / "step_00000006" / "client_state.json").read_text())
    assert saved["config"]["lr"] == 0.01 and saved["config"]["replay_size"] == 2
    assert saved["config"]["log_z_init"] == 0.0  # what was in effect
    assert saved["buffer"]["capacity"] == 2


def test_key_classes_are_disjoint_and_known():
    from fastgfn.trainer import Config
    from fastgfn.trainer.tasks import TASKS

    names = set().union(*(Config(task=t).to_dict() for t in TASKS))
    assert names >= FREE | FIXED and not FREE & FIXED


# client state and replay buffer validation ------------------------------------------------
def _client(run6):  # noqa: F811
    return json.loads((run6[0] / "checkpoints" / STEP4 / "client_state.json").read_text())


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(step=-1), "step"),
    (lambda c: c.update(step="4"), "step"),
    (lambda c: c.update(step=5), "step"),
    (lambda c: c.update(log_z=float("nan")), "log_z"),
    (lambda c: c.pop("buffer"), "buffer"),
    (lambda c: c["buffer"].update(capacity=0), "buffer.capacity"),
    (lambda c: c["buffer"].update(min_distance=-1), "buffer.min_distance"),
    (lambda c: c["buffer"]["entries"]["0"][0].__setitem__(0, float("inf")), "log-reward"),
    (lambda c: c["buffer"]["entries"]["0"][0][1].append(10**6), "token id 1000000"),
    (lambda c: c["buffer"]["entries"]["0"][0][1].append(-1), "token id -1"),
    (lambda c: c["buffer"]["entries"].update({"7": []}), "prompt index"),
    (lambda c: c["buffer"]["entries"].update({"0": [[0.0]]}), "expected [log_reward"),
    (lambda c: c.update(world_size=0), "world_size"),
    (lambda c: c.update(config=[]), "config"),
])
def test_client_state_is_validated_naming_the_field(run6, edit, field):  # noqa: F811
    client = _client(run6)
    check_client_state(client, run6[0] / "checkpoints" / STEP4, 128, 1)  # as saved: fine
    edit(client)
    with pytest.raises(CheckpointError, match=r"client_state.json: .*" + field.split()[0]) as e:
        check_client_state(client, run6[0] / "checkpoints" / STEP4, 128, 1)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_invalid_client_state_falls_back(run6, tmp_path, capsys):  # noqa: F811
    """A checkpoint whose client state fails validation (manifest rewritten to match) is
    skipped with one line naming the field; the run resumes from the one before."""
    out = tmp_path / "run"
    shutil.copytree(run6[0], out)
    path = out / "checkpoints" / "step_00000006"
    client = json.loads((path / "client_state.json").read_text())
    client["buffer"]["entries"]["0"][0][1] = [99999]
    (path / "client_state.json").write_text(json.dumps(client))
    write_marker(path, 6)
    tr = Trainer(_cfg(out, "resume=true"))
    assert tr.maybe_resume() and tr.step == 4
    said = capsys.readouterr().out
    assert "skipping step_00000006" in said and "token id 99999" in said


def test_replay_buffer_never_stores_a_non_finite_reward():
    buf = ReplayBuffer(4)
    assert not buf.add(0, [1, 2], float("nan"))
    assert not buf.add(0, [1, 3], float("inf"))
    assert not buf.add(0, [1, 4], float("-inf"))
    assert buf.add(0, [1, 5], -1.0) and len(buf) == 1
    with pytest.raises(ValueError, match=r"buffer.entries\['0'\]\[0\]: log-reward"):
        buf.load_state_dict({"capacity": 4, "min_distance": 0,
                             "entries": {"0": [[float("nan"), [1]]]}})
    with pytest.raises(ValueError, match="buffer.capacity"):
        buf.load_state_dict({"capacity": 0, "min_distance": 0, "entries": {}})
    with pytest.raises(ValueError, match="token id 9 is not in the vocabulary"):
        buf.load_state_dict({"capacity": 4, "min_distance": 0, "entries": {"0": [[0.0, [9]]]}},
                            vocab_size=9)
    assert torch.equal(buf.to_tensors([[1, 5]])[0], torch.tensor([[1, 5]]))
