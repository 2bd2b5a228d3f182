"""The merging process itself: allocator and garbage-collector settings, how many torch
threads it computes with, and the peak memory it reached. No torch here (run/load.py
imports it while a merge's first bytes are copied)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource

from lazymerge.run.budget import usable_cores

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt numbers
MMAP_THRESHOLD = 32 * 2**20  # buffers from this size up come from mmap, freed to the OS
TRIM_THRESHOLD = 64 * 2**20  # free heap kept for the next chunk's temporaries
# Heaps: the main thread's and one the other threads share. Each thread's own (glibc's
# default) keeps up to TRIM_THRESHOLD free too: a GGUF merge's encoding lane and writer
# threads held ~45 MiB more that way (q8_0, 13B-shaped: 416 MiB peak, 378 with 2).
ARENA_MAX = 2


def tune_process_memory() -> None:
    """Ask glibc to serve every buffer of MMAP_THRESHOLD or more from mmap, and so hand
    it back to the OS when freed. Its default threshold adapts to past frees, which
    leaves freed block buffers in the heap at random and made peak RSS jump by a tensor
    or two. And to keep ARENA_MAX heaps, not one for each thread.

    Also moves every object alive now (torch's module graph, the plan) out of the
    garbage collector's sight: its full collections, triggered by the loop's small
    allocations, traversed them again and again (~4 % of a merge's time in a profile).
    Call it again once torch is in, if it was not (run/load.py does).
    """
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)


def compute_threads(most: int, jobs: int = 1) -> int:
    """torch threads for each of `jobs` merging processes: the cores this process may
    use, less one left to the writer's threads (sha256, pwrite) and the kernel's page
    cache work, never more than torch would take on its own (`most`).

    The CPU computes in cache-sized chunks (see budget.chunk_rows), too small for a thread
    team to pay on two cores: one thread there measured faster, in wall and CPU time.
    """
    return max(1, min(most, usable_cores() // jobs - 1))


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's VmHWM belongs to this process image alone; getrusage's ru_maxrss survives
    exec and so reports the parent's size when a large process started us.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
