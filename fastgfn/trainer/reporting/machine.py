"""What machine a measurement ran on, for every figure the project reports: the CPU model,
the cores this process may use, the vector and matrix extensions that decide the speed of
fp32 and bf16 matmuls (AVX2, AVX-512, AVX-512 BF16, AMX), and whether PyTorch runs bf16
matmuls natively here (oneDNN) or emulates them."""

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


def describe_machine() -> dict:
    """``{"cpu", "cores", "extensions", "bf16_matmuls"}``, ``bf16_matmuls`` "native" or
    "emulated"."""
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
    }


def machine_line(machine: dict | None = None) -> str:
    """One line: "AMD EPYC, 2 cores, avx2; bf16 matmuls emulated"."""
    m = machine or describe_machine()
    ext = ", ".join(m["extensions"]) or "no AVX2"
    return f"{m['cpu']}, {m['cores']} cores, {ext}; bf16 matmuls {m['bf16_matmuls']}"
