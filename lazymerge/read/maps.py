"""Input files as read-only memory maps and descriptors, their pages released after use
(no torch: plain byte copies start from these before torch is imported; read/mapped.py
views them as tensors)."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path
from typing import Self

from lazymerge.errors import InputError
from lazymerge.read.tensorref import TensorRef

PAGE = mmap.PAGESIZE
# A fault maps resident pages around it too (fault_around_bytes, and a large page-cache
# folio up to 2 MiB, whole): reading a range maps the end of the range before it, which
# whoever read that range may have released already; they stayed mapped until the tensor
# ended (~50 MiB at a 13B lm_head on two lanes with 64 KiB, ~0 with 2 MiB). A release
# takes those pages too.
FAULT_AROUND = 2 * 2**20


class MappedFiles:
    """Read-only memory maps of checkpoint files, and their descriptors.

    The maps are opened lazily, one per file, and kept until `close()`; resident pages
    are dropped with `release()` after each use, so RSS stays bounded by what is in use.

    Compute lanes (run/device.py) read and release rows from several threads at once: a
    file is opened and mapped once, under a lock. Releasing pages is safe from any
    thread: a page another lane still reads (one that two row ranges share) is unmapped,
    and faults back in from the page cache, unchanged (the maps are read-only).
    `release_touched` and `close` are for the thread that owns the reader, between tensors.
    """

    def __init__(self, files: MappedFiles | None = None) -> None:
        """New maps, or the very maps (and descriptors) of `files`, shared."""
        self._maps: dict[Path, mmap.mmap] = {} if files is None else files._maps
        self._fds: dict[Path, int] = {} if files is None else files._fds
        self._touched: set[Path] = set() if files is None else files._touched
        # opening and mapping a file, noting it touched
        self._lock: threading.Lock = threading.Lock() if files is None else files._lock

    def _mapped(self, m: mmap.mmap) -> None:
        """Called once for each file newly mapped, with the lock held."""

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None or path not in self._touched:
            with self._lock:
                m = self._maps.get(path)
                if m is None:
                    m = self._maps[path] = mmap.mmap(self._open(path), 0, access=mmap.ACCESS_READ)
                    self._mapped(m)
                self._touched.add(path)
        return m

    def fd(self, path: Path) -> int:
        """The file's descriptor, opened read-only (inputs are never modified)."""
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._open(path)
        return fd

    def _open(self, path: Path) -> int:
        """fd(path), with the lock held."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise InputError(f"{path}: cannot read ({e.strerror})") from None
        return fd

    def raw(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> memoryview:
        """Bytes [start, stop) of a tensor's data, as a view into the map."""
        stop = ref.nbytes if stop is None else stop
        return memoryview(self._map(ref.file))[ref.offset + start : ref.offset + stop]

    def release(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of bytes [start, stop) of a tensor (data stays on disk),
        and those mapped with them in the FAULT_AROUND bytes before."""
        stop = ref.nbytes if stop is None else stop
        m = self._maps.get(ref.file)
        if m is None or stop <= start or ref.strides is not None:
            return  # strided views go with release_touched, after their tensor
        lo = max(0, ref.offset + start - FAULT_AROUND) // PAGE * PAGE
        hi = min(len(m), -(-(ref.offset + stop) // PAGE) * PAGE)
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_touched(self) -> None:
        """Drop every resident page of the files read since the last call.

        Releasing exactly what was read is not enough: the kernel maps neighbouring
        pages around each fault ("fault-around"), which may belong to tensors this merge
        never reads, and those would accumulate over a model.
        """
        with self._lock:
            touched = list(self._touched)  # the set itself: a reader may share it
            self._touched.clear()
        for path in touched:
            m = self._maps[path]
            m.madvise(mmap.MADV_DONTNEED, 0, len(m))

    def close(self) -> None:
        for m in self._maps.values():
            # A view still alive somewhere keeps its map; it goes when the view does.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
