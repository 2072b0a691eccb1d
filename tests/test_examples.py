"""The examples in examples/ run as written: the plain-PyTorch loop (fastgfn's fused log-probs
and SubTB loss in user code) learns its target, and the TRL example trains and saves."""

import math
import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_loop_learns_to_sample_every_digit_equally(capsys):
    runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    m = re.search(r"one digit then stop: ([0-9.]+); digit counts: \[([0-9, ]+)\]", out)
    assert m, out
    counts = [int(c) for c in m.group(2).split(",")]
    n = sum(counts)
    kl = sum(c / n * math.log(10 * c / n) for c in counts if c)
    print(f"valid {m.group(1)}, counts {counts}, KL(empirical || uniform) {kl:.4f}")
    assert float(m.group(1)) > 0.95 and min(counts) > 0
    assert kl < 0.1  # a uniform sampler shows about 9 / 2000 = 0.0045 on 1000 draws


def test_trl_example_trains_and_saves(tmp_path):
    pytest.importorskip("trl")
    example = runpy.run_path(str(EXAMPLES / "trl_gfn.py"), run_name="example")
    trainer = example["main"](["--steps", "3", "--output_dir", str(tmp_path)])
    assert trainer.state.global_step == 3
    assert any("log_reward" in h for h in trainer.state.log_history)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
