"""Resuming a run: which checkpoint, whether it can be trusted, and whether the config still
describes the same run.

``resume(trainer)`` tries the ``step_*`` directories newest first. A directory is taken when
its files match its ``COMPLETE`` manifest (checked by rank 0), its client state, RNG states and
log Z read back and pass their checks (``check_client_state``, the replay buffer's
``check_state``), and the engine loads its files; otherwise it says why in one line and tries
the next. ``--resume`` over step directories of which none can be used is an error, not a
fresh start. A checkpoint the run must not take (another engine or ZeRO stage, or a config
change that is refused) stops resume at once.

Config changes on resume: the keys in ``FREE`` (length of the run, checkpoints, evaluation,
logging, paths, threads) apply; the ones in ``FIXED`` (the model, the task, the seed) never
change on resume; any other difference is refused with the list of differences unless
``allow_config_change`` is set, in which case every difference is applied (the trainer reads
its config at each use; the learning rate, weight decay, schedule and replay capacity are set
again after loading) except ``NO_EFFECT`` ones, which keep the checkpoint's value.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from fastgfn.trainer.engines.distributed import all_ranks_max, rank
from fastgfn.trainer.errors import CheckpointError, IncompatibleCheckpointError
from fastgfn.trainer.persistence import checkpoint
from fastgfn.trainer.persistence.checkpoint_files import verify
from fastgfn.trainer.replay import check_state

FREE = frozenset({
    "steps", "stop_after_steps", "save_every", "keep_checkpoints", "resume",
    "allow_config_change", "output_dir", "export_dir", "save_model", "eval_samples",
    "eval_batch_size", "eval_before", "eval_every", "eval_data_path", "eval_questions",
    "eval_rationales", "histogram", "progress", "tensorboard", "num_threads", "malloc_reuse",
    "max_nonfinite_steps", "deepspeed_config", "device",
})
FIXED = frozenset({
    "model", "gguf_file", "tokenizer", "trust_remote_code", "tiny_hidden", "tiny_layers",
    "lora", "lora_r", "lora_target_modules", "task", "seed",
})
NO_EFFECT = {"log_z_init": "log Z comes from the checkpoint",
             "log_z_auto_init": "log Z comes from the checkpoint"}
_SCHEDULE = ("lr", "weight_decay", "warmup_steps", "lr_schedule", "lr_min_ratio", "steps")


# before anything loads --------------------------------------------------------------------
def check_run_directories(cfg) -> None:
    """Start-up checks (before the model loads): ``output_dir`` and, when the model is
    exported, ``export_dir`` are writable, and a run that does not resume is not about to
    mix its checkpoints with an earlier run's."""
    out = Path(cfg.run.output_dir)
    _check_writable("output_dir", out)
    if cfg.run.save_model:
        _check_writable("export_dir" if cfg.run.export_dir else "output_dir", cfg.model_dir)
    found = checkpoint.step_dirs(out / "checkpoints")
    if found and not cfg.run.resume:
        raise CheckpointError(
            f"output_dir: {out / 'checkpoints'} already holds checkpoints (newest "
            f"{found[0][1].name}); continue that run with --resume, or choose another output_dir"
        )


def _check_writable(key: str, directory: Path) -> None:
    probe = Path(directory) / f".fastgfn-write-test-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{key}: {str(directory)!r} is not writable ({exc.strerror or exc})"
                              ) from None


# choosing and loading ---------------------------------------------------------------------
def resume(trainer) -> bool:
    """Load the newest usable checkpoint into ``trainer``; False when there is none at all."""
    root = trainer.out / "checkpoints"
    found = checkpoint.step_dirs(root)
    if not found:
        trainer.print(f"resume: no checkpoint under {root}; starting fresh")
        return False
    skipped = []
    for _, path in found:
        reason = _verified_on_rank0(path)
        if reason is None:
            try:
                state = _load(trainer, path)
            except IncompatibleCheckpointError:
                raise
            except CheckpointError as exc:
                reason = str(exc)
            if all_ranks_max(int(reason is not None)) and reason is None:
                reason = f"{path.name}: could not be loaded on another rank"
        if reason is None:
            _apply(trainer, path, *state)
            note = f" ({len(skipped)} newer checkpoint(s) skipped, see above)" if skipped else ""
            trainer.print(f"resumed from {path} at step {trainer.step}{note}")
            return True
        skipped.append(reason)
        trainer.print(f"resume: skipping {path.name}: {reason}")
    raise CheckpointError(
        f"resume: no usable checkpoint under {root} ({'; '.join(skipped)}); not starting fresh "
        "over them: move them away or choose another output_dir")


def _verified_on_rank0(path: Path) -> str | None:
    """Rank 0 checks the manifest (reads every file once); every rank gets its verdict."""
    reason = verify(path) if rank() == 0 else None
    if all_ranks_max(int(reason is not None)) and reason is None:
        reason = f"{path.name}: failed verification on rank 0"
    return reason


def _load(trainer, path: Path):
    client, rng, objective = checkpoint.read_state(path)
    check_client_state(client, path, _vocab_size(trainer), trainer.task.num_prompts())
    changed = check_config_change(client["config"], trainer.cfg, path, trainer.print)
    try:
        trainer.engine.load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 (one line naming the checkpoint, then fallback)
        raise CheckpointError(f"{path}: the engine's files could not be loaded "
                              f"({type(exc).__name__}: {exc})".replace("\n", " ")) from exc
    return client, rng, objective, changed


def _apply(trainer, path: Path, client, rng, objective, changed) -> None:
    from fastgfn.trainer.engines.base import reapply_schedule

    cfg = trainer.cfg
    trainer.step = trainer.saved_step = int(client["step"])
    trainer.skips.total = int(client.get("skipped_steps", 0))
    trainer.buffer.load_state_dict(client["buffer"])
    if "replay_size" in changed:
        trainer.buffer.resize(cfg.sampling.replay_size)
    trainer.buffer.min_distance = cfg.sampling.replay_min_distance
    trainer.objective.load_state_dict(objective)
    if any(k in changed for k in _SCHEDULE):
        reapply_schedule(trainer.engine.scheduler, cfg)
    saved_world = int(client.get("world_size", trainer.world))
    trainer.streams.restore(rng, trainer.step, trainer.rank, fresh=trainer.rank >= saved_world)
    if saved_world != trainer.world:
        trainer.print(f"resume: checkpoint of {saved_world} process(es) loaded in {trainer.world}")


def _vocab_size(trainer) -> int | None:
    config = getattr(trainer.engine.module, "config", None)
    return getattr(config, "vocab_size", None)


# checks -----------------------------------------------------------------------------------
def check_client_state(client, path: Path, vocab_size: int | None, num_prompts: int) -> None:
    """``client_state.json`` of checkpoint ``path``: its fields, types and ranges (the replay
    buffer's token ids in the vocabulary, its prompts among the task's, finite rewards and
    log Z, step >= 0 and the directory's own step). A CheckpointError naming the field."""
    where = Path(path) / "client_state.json"
    try:
        _check_client_fields(client, Path(path))
        check_state(client["buffer"], vocab_size, num_prompts)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _check_client_fields(client, path: Path) -> None:
    if not isinstance(client, dict):
        raise ValueError(f"expected an object, got {type(client).__name__}")
    for key in ("step", "buffer", "log_z", "config"):
        if key not in client:
            raise ValueError(f"{key}: missing")
    step = client["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"step: must be an integer >= 0, got {step!r}")
    if path.name != checkpoint.checkpoint_name(step):
        raise ValueError(f"step: {step} does not match the directory {path.name}")
    for key in ("log_z", "reward_temperature"):
        v = client.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{key}: must be a finite number, got {v!r}")
    for key, low in (("world_size", 1), ("skipped_steps", 0)):
        v = client.get(key, low)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ValueError(f"{key}: must be an integer >= {low}, got {v!r}")
    if not isinstance(client["config"], dict):
        raise ValueError("config: expected an object")


def config_differences(saved: dict, cfg) -> dict[str, tuple]:
    """``{key: (checkpoint's value, this run's value)}`` for every key that differs; a key the
    checkpoint does not have counts as its default."""
    new = cfg.to_dict()
    default = type(cfg)(task=cfg.task.name).to_dict()
    return {k: (saved.get(k, default[k]), v) for k, v in new.items()
            if saved.get(k, default[k]) != v}


def check_config_change(saved: dict, cfg, path: Path, say=print) -> set[str]:
    """Refuse or report the differences between the checkpoint's config and ``cfg`` (see the
    module docstring); return the keys that change beyond ``FREE``. ``NO_EFFECT`` keys get
    the checkpoint's value back in ``cfg`` (what the new checkpoints record)."""
    diff = config_differences(saved, cfg)
    show = lambda keys: ", ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in sorted(keys))
    fixed = diff.keys() & FIXED
    if fixed:
        raise IncompatibleCheckpointError(
            f"resume: {path} was saved by a run with other settings that cannot change on "
            f"resume ({show(fixed)}); start a new run instead (from the exported model)")
    other = set(diff) - FREE
    if other and not cfg.run.allow_config_change:
        raise IncompatibleCheckpointError(
            f"resume: the config differs from the one {path} was saved with ({show(other)}); "
            "resume with the saved values, or pass --allow_config_change "
            "(allow_config_change=true) to apply the changes")
    if diff.keys() & FREE:
        say(f"resume: changed: {show(diff.keys() & FREE)}")
    for key in sorted(other & NO_EFFECT.keys()):
        say(f"resume: not applied: {key}: {NO_EFFECT[key]} (kept {diff[key][0]!r})")
        cfg.set(key, diff[key][0])
    applied = other - NO_EFFECT.keys()
    if applied:
        say(f"resume: allow_config_change: applying {show(applied)}")
    return applied
