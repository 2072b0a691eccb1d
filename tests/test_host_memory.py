"""``run.malloc_reuse`` (fastgfn/trainer/engines/host_memory.py): once glibc's malloc keeps
freed memory, a large tensor allocated again after being freed reuses resident pages instead
of faulting in fresh zeroed ones; the trainer applies it on the CPU unless turned off. Each
allocator check runs in a fresh interpreter (the setting is for the rest of a process)."""

import subprocess
import sys

import pytest

from fastgfn.trainer import load_config

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "reuse":
    from fastgfn.trainer.engines.host_memory import keep_freed_memory
    assert keep_freed_memory() is None
    assert keep_freed_memory() is None  # a second call is a no-op
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del x
    return after - before
faults_of_one_allocation()
print(min(faults_of_one_allocation() for _ in range(3)))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused():
    pages = 64 * 2**20 // 4096
    assert _faults("system") > pages // 2  # glibc maps and unmaps a 64 MiB block each time
    assert _faults("reuse") < pages // 20


def test_trainer_applies_it_on_the_cpu(monkeypatch, tmp_path):
    import fastgfn.trainer.run_setup as run_setup
    from fastgfn.trainer import Trainer

    calls = []
    monkeypatch.setattr(run_setup, "keep_freed_memory", lambda: calls.append(1))
    base = ["model=tiny", "steps=1", "progress=false", "eval_samples=0", "save_model=false",
            f"output_dir={tmp_path}", "device=cpu"]
    assert load_config(None, base).run.malloc_reuse is True
    Trainer(load_config(None, base))
    assert calls == [1]
    Trainer(load_config(None, base + ["malloc_reuse=false"]))
    assert calls == [1]
