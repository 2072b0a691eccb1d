"""Checkpoints: engine state + client state (step, replay buffer, log Z, schedules, RNG states).

Layout of ``<output_dir>/checkpoints``::

    step_00000100/   one checkpoint: engine files (engine.json says which engine wrote them),
                     client_state.json, objective.safetensors (log Z), rng_rank*.safetensors
    latest           the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_...`` and renamed into place only when complete, and
``latest`` is replaced atomically after that, so a crash mid-save never leaves a half-written
checkpoint that ``--resume`` would take. Client state is JSON, RNG states safetensors: no
pickle (the torch engine's optimiser state uses ``torch.save`` with tensors only and is
loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fastgfn.trainer.engines.distributed import barrier as _barrier
from fastgfn.trainer.engines.distributed import rank


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


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine, root: Path, step: int, client_state: dict, rng: dict, keep: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save atomically; every rank calls this. ``tensors`` (the objective's state, the same on
    every rank) are written by rank 0 to ``objective.safetensors``."""
    from safetensors.torch import save_file

    root = Path(root)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    engine.save(tmp)
    save_file(
        {k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng_rank{rank()}.safetensors")
    )
    if rank() == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
                  str(tmp / "objective.safetensors"))
        _write_json_atomic(tmp / "client_state.json", client_state)
    _barrier()
    if rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json_atomic(root / "latest", {"tag": name, "step": step})
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    marker = Path(root) / "latest"
    if not marker.is_file():
        return None
    tag = json.loads(marker.read_text())["tag"]
    path = Path(root) / tag
    return path if path.is_dir() else None


def load_checkpoint(engine, path: Path) -> tuple[dict, dict, dict]:
    """Load engine state; return (client_state, this rank's RNG state, objective tensors)."""
    from safetensors.torch import load_file

    engine.load(path)
    client = json.loads((path / "client_state.json").read_text())
    rng_file = path / f"rng_rank{rank()}.safetensors"
    if not rng_file.is_file():  # resumed on a different world size
        rng_file = path / "rng_rank0.safetensors"
    return client, load_file(str(rng_file)), load_file(str(path / "objective.safetensors"))
