"""Host memory while training on the CPU: freed blocks stay in the process instead of going back to the OS.

glibc's malloc serves large blocks (from 128 KiB; its own heuristic raises that threshold, up to 32 MiB, as mapped
blocks are freed) with ``mmap``, and hands free memory at the top of its heap back to the OS once there is more than
twice that threshold. A training step allocates and frees the same tensors every step (activations, their
gradients, per-sample gradients, unfolded patches), so the OS maps and zero-fills those pages again step after
step. On the 2-core development machine that took a quickstart point with max-pool smoothing from 16 to 28 ms a
DP step and from 14 to 24 ms a non-private one (benchmarks/RESULTS.md, issue 17's fourth pass).

:func:`keep_freed_host_memory` sets two of malloc's parameters for the whole process: blocks under 32 MiB (glibc's
largest threshold on 64-bit) come from the heap, and free memory is kept until more than 1 GiB of it sits at the
heap's top. The price is that a process's resident memory does not shrink after its peak, which a training process
returns to every step anyway. Values and arithmetic are unchanged. It is a no-op off glibc (macOS, musl) and
with ``DPNAS_KEEP_FREED_MEMORY=0``, which measures the difference.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc refuses a larger one
TRIM_THRESHOLD = 2**30
OPT_OUT = "DPNAS_KEEP_FREED_MEMORY"


@functools.cache
def keep_freed_host_memory() -> bool:
    """Keep freed host memory in this process (see the module's docstring); True where it now does.

    Called once per process by every training engine, so a search's trials, `dpnas train` and the benchmarks'
    dpnas arms all run with it; a forked search worker inherits it.
    """
    if os.environ.get(OPT_OUT, "1").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting either also ends glibc's dynamic thresholds, so set both or neither
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
