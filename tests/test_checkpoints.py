"""Checkpoints never lose work: resume finds the newest complete checkpoint by itself and falls
back past incomplete or corrupt ones (saying which and why, naming the file), a step is never
saved twice, a failed save (a full disk included) keeps the previous checkpoint and stops with
one line, and the start-up checks refuse what would lose work later. Tiny model, seconds each.
"""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastgfn.train import main
from fastgfn.trainer import CheckpointError, Trainer, load_config
from fastgfn.trainer.persistence import checkpoint as ckpt
from fastgfn.trainer.persistence.checkpoint_files import MARKER, verify, write_marker
from tests.test_train import TINY, _params

COMMON = TINY + ["save_every=2", "keep_checkpoints=3", "lr=1e-3", "warmup_steps=3", "loss=tb",
                 "save_model=false"]


def _cfg(out: Path, *extra: str):
    return load_config(None, COMMON + ["steps=6", f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6 (copied by tests)."""
    out = tmp_path_factory.mktemp("run6") / "run"
    tr = Trainer(_cfg(out))
    tr.run()
    return out, _params(tr.engine.module), tr.objective.log_z.value()


def _copy(run6, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run6[0], out)
    return out


def _same_as_uninterrupted(tr, run6) -> None:
    params = _params(tr.engine.module)
    for k, v in run6[1].items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0)
    assert tr.objective.log_z.value() == run6[2]


def _flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_step_saved_once_and_complete(run6):
    root = run6[0] / "checkpoints"
    assert [p.name for _, p in ckpt.step_dirs(root)] == [
        "step_00000006", "step_00000004", "step_00000002"]
    for _, p in ckpt.step_dirs(root):
        assert verify(p) is None
        manifest = json.loads((p / MARKER).read_text())
        assert {"model.safetensors", "optimizer.pt", "client_state.json",
                "objective.safetensors", "rng_rank0.safetensors"} <= manifest["files"].keys()
    assert not list(root.glob(".tmp-*"))


def test_end_of_run_save_does_not_rewrite_the_periodic_one(tmp_path, monkeypatch):
    """The last periodic save is at the last step: the end of the run must not delete and
    write it again (a kill in between used to leave no checkpoint of that step)."""
    saved = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint",
                        lambda *a, **k: saved.append(a[2]) or real(*a, **k))
    Trainer(load_config(None, COMMON + ["steps=4", f"output_dir={tmp_path}"])).run()
    assert saved == [2, 4]


def test_resume_without_latest_takes_the_newest_complete(run6, tmp_path, capsys):
    out = _copy(run6, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    tr = Trainer(_cfg(out, "resume=true"))
    assert tr.maybe_resume() and tr.step == 4
    tr.cfg.run.resume = False
    tr.run()
    _same_as_uninterrupted(tr, run6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "delete"])
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "client_state.json",
                                  "rng_rank0.safetensors", "objective.safetensors"])
def test_damaged_newest_checkpoint_is_skipped_naming_the_file(run6, tmp_path, file, damage):
    """Verification (no training, no model): every damaged file is named in one line."""
    out = _copy(run6, tmp_path)
    path = out / "checkpoints" / "step_00000006"
    target = path / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        _flip_byte(target)
    elif damage == "delete":
        target.unlink()
    else:
        (path / MARKER).unlink()
    reason = verify(path)
    assert reason is not None and "\n" not in reason
    assert (file in reason) if damage != "no_marker" else ("incomplete" in reason)
    assert verify(out / "checkpoints" / "step_00000004") is None


def test_corrupt_newest_falls_back_and_resumes_exactly(run6, tmp_path, capsys):
    out = _copy(run6, tmp_path)
    _flip_byte(out / "checkpoints" / "step_00000006" / "model.safetensors", at=-3)
    tr = Trainer(_cfg(out, "resume=true"))
    assert tr.maybe_resume() and tr.step == 4
    said = capsys.readouterr().out
    assert "skipping step_00000006" in said and "model.safetensors" in said
    assert "corrupt" in said and "resumed from" in said and "step_00000004" in said
    tr.cfg.run.resume = False
    tr.run()
    _same_as_uninterrupted(tr, run6)


@pytest.mark.parametrize("file, bad", [
    ("client_state.json", b"{not json"),
    ("rng_rank0.safetensors", b"\x00" * 64),
    ("objective.safetensors", b"garbage"),
    ("optimizer.pt", b"PK\x03\x04 not a zip"),
])
def test_unreadable_file_with_a_valid_manifest_is_named(run6, tmp_path, capsys, file, bad):
    """A file that matches its manifest but cannot be read (written so, or the manifest was
    rewritten): one line naming it, then the previous checkpoint."""
    out = _copy(run6, tmp_path)
    path = out / "checkpoints" / "step_00000006"
    (path / file).write_bytes(bad)
    write_marker(path, 6)
    tr = Trainer(_cfg(out, "resume=true"))
    assert tr.maybe_resume() and tr.step == 4
    line = next(x for x in capsys.readouterr().out.splitlines() if "skipping" in x)
    assert file in line


def test_resume_over_unusable_checkpoints_is_an_error(run6, tmp_path, capsys):
    out = _copy(run6, tmp_path)
    for _, p in ckpt.step_dirs(out / "checkpoints"):
        (p / MARKER).unlink()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = [*COMMON, "steps=6", f"output_dir={out}", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgfn: checkpoint error: resume: no usable")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing pruned


def test_resume_with_no_checkpoint_at_all_starts_fresh(tmp_path, capsys):
    tr = Trainer(load_config(None, COMMON + ["steps=2", f"output_dir={tmp_path}", "resume=true"]))
    assert not tr.maybe_resume()
    assert "starting fresh" in capsys.readouterr().out


def test_fresh_run_refuses_an_output_dir_with_checkpoints(run6, tmp_path, monkeypatch, capsys):
    """Before the model loads: another run's checkpoints would be pruned or mixed in."""
    from fastgfn.trainer import run_setup as components

    out = _copy(run6, tmp_path)
    monkeypatch.setattr(components, "build", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        Trainer(_cfg(out))
    assert main([*COMMON, "steps=6", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err.startswith("fastgfn: checkpoint error: output_dir:")


def test_unwritable_export_dir_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from fastgfn.trainer import run_setup as components

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(components, "build", lambda cfg: pytest.fail("the model was loaded"))
    args = [*TINY, "steps=1", f"output_dir={tmp_path / 'out'}", f"export_dir={blocker / 'hf'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgfn: checkpoint error: export_dir:") and str(blocker) in err
    assert main([*TINY, "steps=1", f"output_dir={blocker / 'out'}"]) == 2
    assert "output_dir:" in capsys.readouterr().err


def test_failed_export_saves_the_trained_state_first(tmp_path, monkeypatch):
    """save_every=0 and the export fails: the trained state is checkpointed before the error,
    and --resume then finishes the run (export) without training again."""
    from fastgfn.trainer import trainer as trainer_module

    def broken(*a, **k):
        raise OSError(errno.EIO, "simulated export failure")

    cfg = load_config(None, TINY + ["steps=3", "save_every=0", f"output_dir={tmp_path}"])
    monkeypatch.setattr(trainer_module, "export_model", broken)
    with pytest.raises(OSError, match="simulated export failure"):
        Trainer(cfg).run()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    tr = Trainer(load_config(None, TINY + ["steps=3", "save_every=0", f"output_dir={tmp_path}",
                                            "resume=true"]))
    res = tr.run()
    assert tr.step == 3 and (tmp_path / "model" / "config.json").is_file()
    assert res["model_dir"] == str(tmp_path / "model")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A save that hits ENOSPC (simulated in the safetensors writer): one line saying the disk
    is full, exit status 2, the previous checkpoint complete, no temporary directory left."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def writer(tensors, filename, *a, **k):
        calls.append(filename)
        if "step_00000004" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    assert main([*COMMON, "steps=6", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "step_00000002 is kept" in err[0]
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_00000002"]
    assert verify(root / "step_00000002") is None and not list(root.glob(".tmp-*"))


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True)
    return res.returncode == 0


def test_real_full_disk(run6, tmp_path, capsys):
    """A real full disk (a tmpfs sized for one checkpoint and a half; needs root to mount):
    torch's writer fails with "unexpected pos", reported as a full disk; after the disk is
    enlarged the run resumes from the kept checkpoint and ends exactly as if uninterrupted."""
    one = sum(f.stat().st_size for f in (run6[0] / "checkpoints" / "step_00000002").iterdir())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, (one * 3 // 2 // 4096 + 8) * 4096):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        assert main([*COMMON, "steps=6", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert "disk full" in err and "step_00000002 is kept" in err, err
        assert verify(out / "checkpoints" / "step_00000002") is None
        assert not list((out / "checkpoints").glob(".tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        tr = Trainer(_cfg(out, "resume=true"))
        tr.run()
        assert tr.step == 6
        _same_as_uninterrupted(tr, run6)
    finally:
        import gc

        gc.collect()  # tensors still mapping files of the disk would keep it busy
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_prune_keeps_complete_checkpoints_and_newer_directories(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (9, False)):
        d = root / ckpt.checkpoint_name(step)
        d.mkdir(parents=True)
        (d / "x").write_text(str(step))
        if complete:
            write_marker(d, step)
    ckpt._prune(root, keep=2, step=4)
    assert [p.name for _, p in ckpt.step_dirs(root)] == [
        "step_00000009", "step_00000004", "step_00000003"]
    assert ckpt.latest_checkpoint(root).name == "step_00000004"
