"""Host memory during CPU training: large blocks freed by one step are kept for the next one."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_FREED_BYTES = 1 << 30


def reuse_freed_host_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and to keep up to 1 GiB of freed memory there.

    By default glibc maps every block over 32 MiB afresh and unmaps it when it is freed. Autograd allocates the
    word-embedding gradient (30,522 x 384 floats, 47 MB) anew at every step, so each step paid a page fault for
    every 4 KiB of it: 5.5% of a CPU training step on this project's machine (docs/benchmarks.md). The setting
    holds for the rest of the process. Returns False, and changes nothing, where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no libc.so.6 or no mallopt
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
