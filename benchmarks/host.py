"""What the host took from this VM while something ran: CPU steal.

A virtual machine's cores are threads on someone else's: when the host runs other guests,
this guest's runnable work waits and the kernel counts the time as `steal` (/proc/stat).
A CPU-bound merge then takes longer for no reason of its own, while a disk-bound copy
hardly notices, so a merge/copy ratio measured under steal says more about the
neighbours than about the merge. Every timed child records its share of stolen CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

STAT = Path("/proc/stat")


def stolen() -> float | None:
    """CPU-seconds stolen from all of this machine's cores since boot; None where the
    kernel does not say (not Linux)."""
    try:
        with STAT.open(encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def steal_share(before: float | None, after: float | None, seconds: float) -> float | None:
    """The share of all cores' time stolen over `seconds` of wall time (0 to 1)."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(after - before, 0.0) / ((os.cpu_count() or 1) * seconds)
