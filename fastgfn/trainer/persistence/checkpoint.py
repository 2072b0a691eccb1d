"""Checkpoints: engine state + client state (step, replay buffer, log Z, schedules, RNG states).

Layout of ``<output_dir>/checkpoints``::

    step_00000100/   one checkpoint: engine files (engine.json says which engine wrote them),
                     client_state.json, objective.safetensors (log Z), rng_rank*.safetensors,
                     and COMPLETE, written last (checkpoint_files.py: sizes and CRC-32s)
    latest           the name of the newest checkpoint saved (a hint for people and tools)

What is guaranteed:

- A checkpoint is written into ``.tmp-step_...``; every file is flushed to disk, ``COMPLETE``
  is written last, and only then is the directory renamed into place. A kill at any point of
  a save leaves the previous checkpoints as they were.
- Nothing is deleted before its successor is complete: pruning (``keep`` complete
  checkpoints) runs after the rename, and a run never saves the same step twice.
- Resume (``resume.py``) takes the newest ``step_*`` directory whose files match its
  ``COMPLETE`` manifest and load, falling back past incomplete or corrupt ones; ``latest`` is
  not trusted.
- A save that fails (a full disk included) removes its temporary directory and raises a
  ``CheckpointError`` (``DiskFullError``) that names the directory and the checkpoint kept.
- No pickle: client state is JSON, RNG states and log Z safetensors, the torch engine's
  optimiser state ``torch.save`` of tensors loaded with ``weights_only=True``; DeepSpeed's
  files are loaded with ``weights_only=True`` too (``engines/safe_load.py``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastgfn.trainer.engines.distributed import all_ranks_max, rank
from fastgfn.trainer.engines.distributed import barrier as _barrier
from fastgfn.trainer.errors import CheckpointError, DiskFullError
from fastgfn.trainer.persistence.checkpoint_files import (
    free_space,
    fsync_dir,
    is_complete,
    is_disk_full,
    write_json_atomic,
    write_marker,
)

STEP_DIR = re.compile(r"^step_(\d{8})$")

# Test hook: called with a label after each file operation of a save (tests/test_faults.py
# kills the process there). None in normal runs.
fault_hook = None


def _op(label: str) -> None:
    if fault_hook is not None:
        fault_hook(label)


def rng_state(generator: torch.Generator | None, py_rng: random.Random | None) -> dict:
    """Every RNG state as tensors (torch global, sampler generator, Python, NumPy, CUDA)."""
    out = {"torch": torch.random.get_rng_state()}
    if generator is not None:
        out["generator"] = generator.get_state()
    if py_rng is not None:
        out["py_rng"] = torch.tensor(py_rng.getstate()[1], dtype=torch.int64)
    out["python"] = torch.tensor(random.getstate()[1], dtype=torch.int64)
    np_state = np.random.get_state()
    out["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    out["numpy_pos"] = torch.tensor([np_state[2]], dtype=torch.int64)
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict, generator: torch.Generator | None, py_rng: random.Random | None):
    torch.random.set_rng_state(state["torch"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if py_rng is not None and "py_rng" in state:
        py_rng.setstate((3, tuple(int(x) for x in state["py_rng"].tolist()), None))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0)
    )
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_XXXXXXXX`` directory under ``root``, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint with its ``COMPLETE`` marker (files not verified: resume does)."""
    return next((p for _, p in step_dirs(root) if is_complete(p)), None)


# saving -----------------------------------------------------------------------------------
def save_checkpoint(
    engine, root: Path, step: int, client_state: dict, rng: dict, keep: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save (see the module docstring); every rank calls this. ``tensors`` (the objective's
    state, the same on every rank) are written by rank 0 to ``objective.safetensors``."""
    root = Path(root)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    error = _attempt(_prepare, root, tmp) if rank() == 0 else None
    _agree(error, root, tmp, name)
    error = _attempt(_write_files, engine, tmp, client_state, rng, tensors)
    _agree(error, root, tmp, name)
    if rank() == 0:
        error = _attempt(write_marker, tmp, step) or _attempt(_publish, root, tmp, final)
    _agree(error, root, tmp, name)
    if rank() == 0:
        _after_publish(root, name, step, keep)
    _barrier()
    return final


def _attempt(fn, *args) -> Exception | None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 (reported by _agree, on every rank)
        return exc
    return None


def _agree(error: Exception | None, root: Path, tmp: Path, name: str) -> None:
    """Every rank learns whether any rank failed; then all raise, the temporary directory
    removed (the previous checkpoints are untouched)."""
    if not all_ranks_max(int(error is not None)):
        return
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = latest_checkpoint(root)
    kept = f"the previous checkpoint {kept.name} is kept" if kept else "no earlier checkpoint"
    if error is None:
        raise CheckpointError(f"saving checkpoint {name} failed on another rank; {kept}")
    what = f"{type(error).__name__}: {error}".replace("\n", " ")
    if is_disk_full(error, root if root.exists() else root.parent):
        raise DiskFullError(
            f"disk full: saving checkpoint {name} under {root} failed ({what}; "
            f"{free_space(root if root.exists() else root.parent)}); {kept}. Free some space, "
            "then continue with --resume") from error
    raise CheckpointError(f"saving checkpoint {name} under {root} failed ({what}); {kept}") \
        from error


def _prepare(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    _op("mkdir")


def _write_files(engine, tmp: Path, client_state: dict, rng: dict, tensors) -> None:
    from safetensors.torch import save_file

    engine.save(tmp)
    _op("engine")
    save_file({k: v.contiguous() for k, v in rng.items()},
              str(tmp / f"rng_rank{rank()}.safetensors"))
    _op("rng")
    if rank() == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
                  str(tmp / "objective.safetensors"))
        _op("objective")
        write_json_atomic(tmp / "client_state.json", client_state)
        _op("client_state")


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` into place. A directory already there is one this run did
    not save (the trainer never saves a step twice): an incomplete one, or one resume
    refused."""
    _op("marker")
    if final.exists():
        shutil.rmtree(final)
        _op("remove_same_step")
    tmp.rename(final)
    fsync_dir(root)
    _op("rename")


def _after_publish(root: Path, name: str, step: int, keep: int) -> None:
    """The ``latest`` hint and pruning; the new checkpoint is complete, so a failure here
    only warns."""
    try:
        write_json_atomic(root / "latest", {"tag": name, "step": step})
        _op("latest")
        _prune(root, keep, step)
    except OSError as exc:
        print(f"fastgfn: warning: checkpoint {name} is saved, but updating {root} failed: {exc}",
              flush=True)


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the ``keep`` newest complete checkpoints up to ``step``; remove older ones and
    incomplete directories older than ``step``. Newer directories (ones resume refused) stay."""
    kept = 0
    for s, path in step_dirs(root):
        if s > step:
            continue
        if is_complete(path) and kept < keep:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
        _op("prune")


# loading ----------------------------------------------------------------------------------
def read_state(path: Path) -> tuple[dict, dict, dict]:
    """(client state, this rank's RNG state, objective tensors) of checkpoint ``path``; a
    ``CheckpointError`` naming the file that cannot be read. The engine state is loaded by
    ``engine.load(path)``."""
    from safetensors.torch import load_file

    path = Path(path)
    client_file = path / "client_state.json"
    try:
        client = json.loads(client_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{client_file}: unreadable ({type(exc).__name__}: {exc})") from None
    rng_file = path / f"rng_rank{rank()}.safetensors"
    if not rng_file.is_file():  # resumed on a different world size
        rng_file = path / "rng_rank0.safetensors"
    tensors = []
    for file in (rng_file, path / "objective.safetensors"):
        try:
            tensors.append(load_file(str(file)))
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
            raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
    return client, tensors[0], tensors[1]
