"""Freed host memory kept mapped for reuse, so a CPU round does not page-fault its way through.

On the CPU every tensor is a malloc. glibc serves large blocks (from 128 KiB, a threshold it
moves up to 32 MiB) with fresh mmap'd pages, and hands freed ones back to the kernel (munmap, heap
trimming). A round makes and drops hundreds of MB a step (activations, weight casts, logit chunks),
so it keeps touching fresh pages: each one a fault and a page the kernel zeroes, dearer still in a
VM that reports freed pages to its host. One SmolLM2 recite round (4 steps) took 290-500 k faults
and 0.7-1.2 s of system time in 16-21 s; with this alone, 130-180 k and 0.5-1.0 s (docs/performance.md,
"Host memory kept for reuse").

With mmap off and trimming out of reach (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB), freed blocks
stay in the heap and the next step's tensors reuse them, as PyTorch's caching allocator does on a
GPU: the process's resident memory stays at its high-water mark instead of falling back between
steps. The engine applies it when it is built on the CPU; ABSORBER_KEEP_FREED_MEMORY=0 in the
environment leaves malloc as it was (an embedding process that wants its memory returned).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

ENV = "ABSORBER_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4          # glibc's mallopt parameter numbers (malloc.h)
_TRIM_THRESHOLD = 2**31 - 1                      # the largest a C int holds: never reached in practice

_lock = threading.Lock()
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory for reuse, once per process. Returns whether it is in
    effect: False where the environment turns it off or the C library is not glibc."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> bool:
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; the trim threshold first, so a refusal of the second leaves
    # only a harmless setting behind.
    return libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
