"""Fault injection: a run killed (``os._exit``, no cleanup) after each file operation of a
checkpoint save, one kill point after another until the save completes, resumes from the
newest complete checkpoint (the one being written when the kill came after its rename, else
the one before, never both lost: ``keep_checkpoints=1`` makes the save delete its predecessor)
and ends bit-equal to the uninterrupted run (parameters and log Z). The runs are forked from
one subprocess, ``tests/fault_driver.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import TINY

ROOT = Path(__file__).resolve().parent.parent
ARGS = TINY + ["steps=5", "save_every=2", "keep_checkpoints=1", "lr=1e-3", "warmup_steps=3",
               "loss=tb", "save_model=false"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_at_every_point_of_a_save_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), str(tmp_path),
                          *ARGS], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = {int(k): v for k, v in json.loads((tmp_path / "report.json").read_text()).items()}
    ref = load_file(str(tmp_path / "ref.safetensors"))
    labels = [report[k]["label"] for k in sorted(report) if report[k]["status"] != 0]
    # every kind of operation of the save was a kill point
    for op in ("mkdir", "save_file:model.safetensors", "torch.save:optimizer.pt", "engine",
               "save_file:rng_rank0.safetensors", "objective", "client_state", "marker",
               "rename", "latest", "prune"):
        assert any(x == op or x.startswith(op) for x in labels), (op, labels)
    renamed = labels.index("rename") + 1
    for k, r in sorted(report.items()):
        assert r["status"] in (0, 137) and r["resume_status"] == 0, r
        expected = 5 if r["status"] == 0 else 4 if k >= renamed else 2  # 5: not killed
        assert r["resumed_from"] == expected, (k, r)
        assert any(name.startswith("step_") for name in r["left_by_kill"]), r
        got = load_file(str(tmp_path / f"k{k}.safetensors"))
        assert got.keys() == ref.keys()
        for name, v in ref.items():
            assert torch.equal(got[name], v), (k, r["label"], name)
    assert report[max(report)]["status"] == 0  # the last k: the save completed
