"""Ahead-of-time compilation of fastgfn's Triton kernels for the H100 (sm_90), without a GPU.

The Triton interpreter accepts code that the GPU compiler rejects, so CI compiles every kernel
configuration for sm_90 and inspects the result: register count and spills (from ``ptxas -v``
on the generated PTX) and whether ``tl.dot`` became Hopper ``wgmma`` instructions.

Each Triton kernel module exposes ``aot_configs()`` returning :class:`AotConfig` items. Run
``python -m fastgfn.kernels.aot MODULE [MODULE ...]`` in a process *without*
``TRITON_INTERPRET``; it prints one JSON line per configuration.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any


@dataclasses.dataclass
class AotConfig:
    name: str
    kernel: Any  # a triton JITFunction
    signature: dict[str, str]  # argument name -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    expect_wgmma: bool = False


def _ptxas_report(ptx: str) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr
    spill_stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    spill_loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=-1)
    return {"registers": regs, "spill_stores": spill_stores, "spill_loads": spill_loads}


def compile_sm90(config: AotConfig) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(config.kernel, config.signature, config.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx = compiled.asm["ptx"]
    report = {
        "name": config.name,
        "wgmma": "wgmma.mma_async" in ptx,
        "expect_wgmma": config.expect_wgmma,
        "shared_bytes": compiled.metadata.shared,
        "cubin_bytes": len(compiled.asm["cubin"]),
    }
    report.update(_ptxas_report(ptx))
    return report


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
        return 2
    for module_name in argv:
        module = importlib.import_module(module_name)
        for config in module.aot_configs():
            print(json.dumps(compile_sm90(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
