"""The honest baseline (issue 19): the merge's bytes moved as fast as this disk moves them.

`overlapped_copy` reads exactly the byte ranges the merge reads while writing as many
bytes as the merge writes, in the same files-by-size layout, each output file fsynced
when complete: a reader thread fills a small ring of buffers, the writer writes from
each buffer as it arrives, in proportion (out bytes per in byte), so reads, writes and
the kernel's writeback all overlap, as in the merge. It approaches max(read time, write
time), the physical limit; `runner.copy_baseline` (read everything, then write) is the
older, slower one, reported beside it for one release.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUFFER = 16 * 2**20
RING = 4  # buffers in flight: the reader runs at most this far ahead of the writer


def overlapped_copy(
    reads: list[list[Any]],
    out_sizes: list[int],
    directory: Path,
    make_writer: Callable[[Path, list[int], int], Writer] | None = None,
    buffer: int = BUFFER,
) -> float:
    """Seconds to read `reads` ([file, offset, length] each) while writing files of
    `out_sizes` bytes into `directory`, overlapped and fsynced; `make_writer` writes
    (benchmarks/odirect.py's ways of writing), through a ring of `buffer`-byte buffers,
    page-aligned (mmap) as uncached writes need."""
    directory.mkdir(parents=True, exist_ok=True)
    free: queue.Queue[memoryview] = queue.Queue()
    for _ in range(RING):
        free.put(memoryview(mmap.mmap(-1, buffer)))
    filled: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
    start = time.monotonic()
    reader = threading.Thread(target=_read_all, args=(reads, free, filled), daemon=True)
    reader.start()
    writer = (make_writer or Writer)(directory, out_sizes, sum(int(r[2]) for r in reads))
    try:
        while (item := filled.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            writer.write_for(buf, n)
            free.put(buf)
        writer.finish(memoryview(mmap.mmap(-1, buffer)))
    finally:
        writer.close()
        reader.join()
    return time.monotonic() - start


def read_fd(fds: dict[str, int], file: str) -> int:
    """`file` opened read-only once, kept in `fds` (setdefault would open it again for
    every range, and leak each descriptor)."""
    fd = fds.get(file)
    if fd is None:
        fd = fds[file] = os.open(file, os.O_RDONLY)
    return fd


def _read_all(
    reads: list[list[Any]],
    free: queue.Queue[memoryview],
    filled: queue.Queue[tuple[memoryview, int] | BaseException | None],
) -> None:
    fds: dict[str, int] = {}
    try:
        for file, offset, length in reads:
            fd = read_fd(fds, file)
            while length > 0:
                buf = free.get()
                n = os.preadv(fd, [buf[: min(length, len(buf))]], offset)
                if n <= 0:
                    raise RuntimeError(f"{file}: short read at {offset}")
                filled.put((buf, n))
                offset, length = offset + n, length - n
        filled.put(None)
    except BaseException as e:  # handed to the writer's thread, which raises it
        filled.put(e)
    finally:
        for fd in fds.values():
            os.close(fd)


class Writer:
    """Output files of the given sizes, written in order, `ratio` bytes per byte read.

    A subclass writes another way (benchmarks/odirect.py): `_flags` to open a file,
    `_opened` once it is, `_put` for each write, and ALIGN, the block every write but a
    file's last is a whole number of."""

    ALIGN = 1

    def __init__(self, directory: Path, sizes: list[int], total_in: int) -> None:
        self.directory, self.sizes = directory, list(sizes)
        self.ratio = sum(sizes) / total_in if total_in else 0.0
        self.owed = 0.0  # bytes the writer is behind the reader, in proportion
        self.index, self.left, self.fd = -1, 0, -1
        self._next_file()

    def _next_file(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
        while self.left == 0 and self.index + 1 < len(self.sizes):
            self.index += 1
            self.left = self.sizes[self.index]
            path = self.directory / f"copy-{self.index}.bin"
            self.fd = os.open(path, self._flags(), 0o644)
            if self.left == 0:
                os.close(self.fd)
                self.fd = -1
            else:
                self._opened()

    def _flags(self) -> int:
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    def _opened(self) -> None:
        """A new file is open (self.fd)."""

    def write_for(self, buf: memoryview, n: int) -> None:
        """Write what `n` bytes just read owe the output, from `buf`."""
        self.owed += n * self.ratio
        self._write(buf, n, int(self.owed))

    def finish(self, filler: memoryview) -> None:
        """The rest of every file (rounding), from `filler`, then the last fsync."""
        self._write(filler, len(filler), sum(self.sizes))
        self._next_file()

    def _write(self, buf: memoryview, n: int, amount: int) -> None:
        while amount > 0 and self.fd >= 0:
            step = min(amount, self.left, n)
            if step < self.left:
                step -= step % self.ALIGN  # whole blocks, except a file's last bytes
            if step == 0:
                return
            done = self._put(buf[:step])
            amount, self.left, self.owed = amount - done, self.left - done, self.owed - done
            if self.left == 0:
                self._next_file()

    def _put(self, data: memoryview) -> int:
        """Write `data` at the file's position; bytes written."""
        return os.write(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
