"""Seeded short runs of every shipped config, reduced to the metrics they log, for checking
that a refactor changes no result: run it before and after, then compare the two files.

    python scripts/config_fingerprints.py --out before.json
    python scripts/config_fingerprints.py --out after.json --compare before.json

Each config runs ``--steps`` steps (12) with its own seed, evaluation cut to a few samples
(every evaluation path still runs: before, every 6 steps, after), no checkpoints, no export,
no pictures. The paper's configs name models this machine cannot download: they run with
``model=smollm2`` and LoRA on its attention projections instead (and the packaged story
fixture for infilling), every other key as shipped. Timings are dropped from the metrics;
everything else must be equal to the last bit (floats compared by their repr)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "fastgfn" / "configs"
COMMON = ["eval_samples=8", "eval_batch_size=8", "eval_every=6", "eval_questions=2",
          "eval_rationales=2", "save_every=0", "save_model=false", "histogram=false",
          "training_curves=false", "progress=false", "num_threads=2"]
PAPER = ["model=smollm2", "dtype=float32", "lora_target_modules=q_proj,k_proj,v_proj,o_proj",
         "batch_size=4", "grad_accum=1"]
EXTRA = {"paper/infilling": ["data_path=data/stories/fixture.csv"]}
TIMING_WORDS = ("seconds", "memory", "memory_mb", "time", "per_s", "per_sec", "_s", "throughput",
                "elapsed")


def shipped() -> list[str]:
    names = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml"))
    return names


def _is_timing(key: str) -> bool:
    words = key.split("_")
    return any(key.endswith(w) or w in words for w in TIMING_WORDS) or "time" in key \
        or "memory" in key


def _clean(record):
    if isinstance(record, dict):
        return {k: _clean(v) for k, v in sorted(record.items()) if not _is_timing(k)}
    if isinstance(record, list):
        return [_clean(v) for v in record]
    if isinstance(record, float):
        return repr(record)
    return record


def run_config(name: str, steps: int) -> list:
    with tempfile.TemporaryDirectory() as out:
        args = [f"steps={steps}", f"output_dir={out}", *COMMON]
        if name.startswith("paper/"):
            args += PAPER
        args += EXTRA.get(name, [])
        cmd = [sys.executable, "-m", "fastgfn.train", "--config", name, *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return [_clean(json.loads(line)) for line in lines if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="an earlier --out to compare with")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", default=None, help="comma list of config names")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else shipped()
    results = {}
    for name in names:
        t = time.time()
        results[name] = run_config(name, a.steps)
        print(f"{name}: {len(results[name])} records, {time.time() - t:.0f} s", flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    if a.compare:
        before = json.loads(Path(a.compare).read_text())
        bad = [n for n in names if before.get(n) != results[n]]
        for n in bad:
            for i, (x, y) in enumerate(zip(before.get(n, []), results[n])):
                if x != y:
                    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                    print(f"{n}: record {i} differs in {keys[:8]}")
                    break
            else:
                print(f"{n}: {len(before.get(n, []))} records before, {len(results[n])} after")
        print("bit-identical" if not bad else f"DIFFERENT: {bad}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
