"""Tensor bytes from read-only memory maps: zero-copy views, pages released after use, so
resident memory does not grow with the size of the model."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import warnings
from pathlib import Path

import torch

from lazymerge.errors import InputError
from lazymerge.read.tensorref import TensorRef, itemsize

PAGE = mmap.PAGESIZE
_QUIET = threading.Lock()
_quieted = False  # torch's one not-writable warning taken (see _quiet)
# safetensors dtype code -> torch dtype (their sizes: tensorref.ITEMSIZE; a test checks both agree).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class MappedReader:
    """Read-only memory maps of checkpoint files, handing out zero-copy tensor views.

    The maps are opened lazily, one per file, and kept until `close()`; resident pages
    are dropped with `release()` after each use, so RSS stays bounded by what is in use.

    Compute lanes (run/device.py) read and release rows from several threads at once: a
    file is opened and mapped once, under a lock. Releasing pages is safe from any
    thread: a page another lane still reads (one that two row ranges share) is unmapped,
    and faults back in from the page cache, unchanged (the maps are read-only).
    `release_touched` and `close` are for the thread that owns the reader, between tensors.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._touched: set[Path] = set()
        self._lock = threading.Lock()  # opening and mapping a file, noting it touched

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None or path not in self._touched:
            with self._lock:
                m = self._maps.get(path)
                if m is None:
                    m = self._maps[path] = mmap.mmap(self._open(path), 0, access=mmap.ACCESS_READ)
                    _quiet(m)
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

    def rows(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) of a tensor as a zero-copy, read-only torch view.

        Never modify the result in place: the map is read-only. Copy it first.
        """
        shape = (row_stop - row_start, *ref.shape[1:]) if ref.shape else ()
        if ref.blocks is not None:  # a GGUF tensor: decoded, a copy (and not read-only)
            return self._decoded(ref, row_start, row_stop).view(shape)
        if ref.strides is not None:  # a strided .bin view: map its reach, then stride it
            whole = self._frombuffer(ref, ref.offset, (ref.span or 0) // itemsize(ref.dtype))
            return whole.as_strided(ref.shape, ref.strides)[row_start:row_stop]
        count = (row_stop - row_start) * (ref.row_nbytes // itemsize(ref.dtype))
        return self._frombuffer(ref, ref.offset + row_start * ref.row_nbytes, count).view(shape)

    def _decoded(self, ref: TensorRef, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows of a GGUF tensor in transformers' order: dequantized to float32, or its
        plain dtype's values, rows put back in place (read/gguf_model.py)."""
        import numpy as np

        from lazymerge.read.gguf_model import decode_rows

        raw = np.frombuffer(self._map(ref.file), np.uint8, count=ref.nbytes, offset=ref.offset)
        rows = decode_rows(raw.reshape(ref.rows, -1), ref, row_start, row_stop)
        if rows.dtype == np.uint8:  # a plain type's bytes, gathered
            return torch.from_numpy(np.ascontiguousarray(rows)).view(DTYPES[ref.dtype])
        return torch.from_numpy(rows)

    def _frombuffer(self, ref: TensorRef, offset: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=DTYPES[ref.dtype])
        m = self._map(ref.file)  # (torch's not-writable warning: taken by _quiet)
        return torch.frombuffer(m, dtype=DTYPES[ref.dtype], count=count, offset=offset)

    def release(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of bytes [start, stop) of a tensor (data stays on disk)."""
        stop = ref.nbytes if stop is None else stop
        m = self._maps.get(ref.file)
        if m is None or stop <= start or ref.strides is not None:
            return  # strided views go with release_touched, after their tensor
        lo = (ref.offset + start) // PAGE * PAGE
        hi = min(len(m), -(-(ref.offset + stop) // PAGE) * PAGE)
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_touched(self) -> None:
        """Drop every resident page of the files read since the last call.

        Releasing exactly what was read is not enough: the kernel maps neighbouring
        pages around each fault ("fault-around"), which may belong to tensors this merge
        never reads, and those would accumulate over a model.
        """
        with self._lock:
            touched, self._touched = self._touched, set()
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

    def __enter__(self) -> MappedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet(m: mmap.mmap) -> None:
    """torch warns, once per process, that a read-only buffer is not writable: that is
    the point of ACCESS_READ. The first view is taken with that warning ignored, so no
    view after it needs catch_warnings — which swaps the process's filters, so would need
    a lock around every view, serialising the lanes."""
    global _quieted
    with _QUIET:
        if _quieted or len(m) == 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.frombuffer(m, dtype=torch.uint8, count=1)
        _quieted = True
