"""What the C allocator does with freed memory in a CPU training process (``malloc_reuse``).

A training step allocates and frees the same large tensors every time: the gradients of the
weights (the tied [V, H] embedding twice), the bf16 copies of the weights under autocast, the
activations. glibc's malloc hands any block above its mmap threshold (at most 32 MB, and
small blocks after a trim) back to the kernel when it is freed, so the next step's tensor of
the same size is fresh memory: one page fault per 4 KiB, each page zeroed by the kernel before
PyTorch writes it again. ``keep_freed_memory`` makes malloc serve every block from its heap
and never trim the heap, so a step reuses the pages of the last one: on 2 cores of an AMX Xeon
(bench/RESULTS.md, issue 18) the bf16 step's teacher-forced pass went from 107 k page faults
to 6 k and its backward from 1.30 s to 1.00 s. The cost: the process keeps its high-water mark
of memory (which the next step needs again anyway) instead of returning it between steps.

Only glibc is touched (``mallopt``); with another C library, or where the call fails, nothing
changes and the reason is returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> str | None:
    """Make glibc's malloc keep freed memory for reuse (no mmap'd blocks, no heap trimming)
    for the rest of the process; None once done, or why it was not."""
    global _applied
    if _applied:
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return "no C library found"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
    except (OSError, AttributeError):
        return f"{name} is not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, _INT_MAX)):
        return "mallopt refused the settings"
    _applied = True
    return None
