"""The kernel's ways of getting a shard's bytes to disk, and which of them this machine
and filesystem take: copy_file_range (file to file), pwritev2's RWF_DONTCACHE (uncached
writes), sync_file_range (writeback started early). The writer (safetensors.py) uses them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

# copy_file_range's ways of saying "not between these two files": fall back to pwrite.
COPY_RANGE_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
# Filesystems where copy_file_range clones blocks or copies server-side, so copied
# tensors move no data through this machine. Elsewhere (ext4, tmpfs, overlay) the kernel
# copy measured slower than writing from the map (0.50-0.56 vs 0.76-0.95 GiB/s, cold,
# see BENCHMARKS.md), and the bytes are read and written (run/copies.py CopyBuffers). LAZYMERGE_COPY_RANGE=always|never overrides.
CLONING_FS = frozenset(
    {"btrfs", "xfs", "bcachefs", "zfs", "ocfs2", "nfs", "nfs4", "cifs", "smb3", "ceph"}
)
# Bytes written between two starts of writeback (sync_file_range: asynchronous).
WRITEBACK = 64 * 2**20
SYNC_FILE_RANGE_WRITE = 2
# pwritev2's RWF_DONTCACHE (linux/fs.h, Linux 6.14+; Python 3.11 does not name it): a
# buffered write whose writeback starts at once and whose pages leave the cache once on
# disk. The merge never reads a shard back, and filling ever more fresh page-cache pages
# was most of its system time: a 2-layer 13B-shaped merge (1.8 GB out, 2 cores, cold)
# took 8.2-8.6 s against 9.0-10.9 s, system CPU 4.0-4.4 s against 5.7-6.6 s (medians,
# alternated runs, BENCHMARKS.md). Refused (EOPNOTSUPP) by older kernels and by
# filesystems without it (tmpfs): plain pwrite then. LAZYMERGE_DONTCACHE=0 turns it off.
RWF_DONTCACHE = 0x80
DONTCACHE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL}


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the final fsync does it all
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


sync_file_range = _libc_sync_file_range()


def dontcache_wanted() -> bool:
    """Whether to try RWF_DONTCACHE writes (Linux only; LAZYMERGE_DONTCACHE=0: never)."""
    return sys.platform == "linux" and os.environ.get("LAZYMERGE_DONTCACHE", "1") != "0"


def kernel_copy_pays(directory: Path) -> bool:
    """Whether copied tensors should go file to file (copy_file_range) into `directory`."""
    choice = os.environ.get("LAZYMERGE_COPY_RANGE", "auto")
    if choice in ("always", "never"):
        return choice == "always"
    return filesystem(directory) in CLONING_FS


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on ("" when /proc/self/mountinfo can't say)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                mount = fields.split()[4].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, rest.split()[0]
    except (OSError, IndexError):
        return ""
    return kind
