"""Keep freed CPU memory in the process, so that training steps stop page-faulting their gradients back in.

PyTorch's CPU allocator is the C library's `malloc`. glibc serves every block above 32 MB with a fresh `mmap` and
unmaps it on `free`, so a training step that allocates large tensors gets them from the kernel again every step:
zeroed page by page, and with transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`) sometimes after seconds of page
compaction. Expert banks make this the dominant cost: at MoEUT's 244M shape one sigma-MoE layer writes 400 MB of
fresh weight gradients per step, and on a 2-core machine its forward + backward took 0.4-2.0 s per step with
glibc's defaults against a steady 0.32-0.37 s with freed memory kept (peak resident memory +20%).

This is a process-wide setting, for applications (the `mom` command, the benchmarks), never done by the modeling
code. The environment variables `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`, or preloading jemalloc or
tcmalloc (`LD_PRELOAD`), have the same effect for any script, e.g. one that runs the HF `Trainer` on a CPU.
"""

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest threshold mallopt takes (an int): return the heap top only past 2 GB free


def keep_freed_memory() -> bool:
    """Make glibc's `malloc` serve large blocks from its heap and keep freed ones for reuse.

    Returns whether the setting took effect: False, doing nothing, where the C library is not glibc (macOS, musl).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
