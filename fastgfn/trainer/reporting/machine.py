"""What machine a measurement ran on, for every figure the project reports: the CPU model,
the cores this process may use, the vector and matrix extensions that decide the speed of
fp32 and bf16 matmuls (AVX2, AVX-512, AVX-512 BF16, AMX), whether PyTorch runs bf16
matmuls natively here (oneDNN) or emulates them, and how the fused lm_head's bf16 products
run (kernels/cpu/bf16_gemm.h: MKL on AMX, the AVX512-BF16 kernel, or fp32)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_facts(cpuinfo: str) -> dict:
    """``{"model", "extensions"}`` from the text of ``/proc/cpuinfo`` (its first processor)."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "extensions": [e for e in EXTENSIONS if e in flags]}


def native_bf16_matmuls() -> bool:
    """Whether PyTorch's oneDNN runs bf16 matmuls natively on this CPU."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def lm_head_bf16_products() -> str:
    """How the C++ fused lm_head runs bf16 products here: "mkl", "avx512_bf16", "off", or
    "unavailable" without the C++ kernels."""
    from fastgfn._extension import cpu_kernels_available

    if not cpu_kernels_available():
        return "unavailable"
    import torch

    return str(torch.ops.fastgfn_cpu.bf16_gemm_backend())


def describe_machine() -> dict:
    """``{"cpu", "cores", "extensions", "bf16_matmuls", "lm_head_bf16_products"}``,
    ``bf16_matmuls`` "native" or "emulated"."""
    try:
        facts = cpu_facts(Path("/proc/cpuinfo").read_text())
    except OSError:
        facts = {"model": "", "extensions": []}
    return {
        "cpu": facts["model"] or platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "extensions": facts["extensions"],
        "bf16_matmuls": "native" if native_bf16_matmuls() else "emulated",
        "lm_head_bf16_products": lm_head_bf16_products(),
    }


def machine_line(machine: dict | None = None) -> str:
    """One line: "AMD EPYC, 2 cores, avx2; bf16 matmuls emulated; lm_head bf16 products off"
    (the last part where the machine's description has it)."""
    m = machine or describe_machine()
    ext = ", ".join(m["extensions"]) or "no AVX2"
    line = f"{m['cpu']}, {m['cores']} cores, {ext}; bf16 matmuls {m['bf16_matmuls']}"
    if "lm_head_bf16_products" in m:
        line += f"; lm_head bf16 products {m['lm_head_bf16_products']}"
    return line
