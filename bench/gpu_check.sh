#!/usr/bin/env bash
# One-shot GPU check for a session that is lent a GPU machine (device tool): build, run every
# Triton kernel's tests natively against the float64 references, compile-check, and time the
# kernels. Writes logs to $OUT (or ./gpu_out). Budget: well under 10 minutes on an H100.
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pip install -q --no-build-isolation -e . >"$OUT/install.log" 2>&1 || true
export FASTGFN_TEST_NATIVE_TRITON=1
timeout 240 python3 -m pytest -q -x -k "triton" tests/test_subtb.py $(ls tests/test_*logprobs*.py 2>/dev/null) \
  2>&1 | tail -20 | tee "$OUT/tests.txt"
timeout 120 python3 -m bench.bench_subtb --device cuda 2>&1 | tee "$OUT/bench_subtb.md"
for script in bench/bench_*_gpu.py; do
  [ -e "$script" ] || continue
  name=$(basename "$script" .py)
  timeout 180 python3 "$script" 2>&1 | tee "$OUT/$name.md"
done
