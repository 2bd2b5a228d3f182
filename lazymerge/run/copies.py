"""Plain byte copies: a tensor whose output bytes are one input's, as they are, handed
to the shard writer chunk by chunk; a shard's copies on a lane of their own. No torch:
they run while torch is still being imported (run/load.py), then beside the arithmetic.

Into a safetensors shard, a copy is read (`preadv`) into buffers of its own, which the
writer writes and hashes from and hands back: an 8-layer 13B-shaped copy (5.7 GB, cold)
ran 10.4-11.4 s against 12.8-16.0 s with the writer reading the input's map, which made
its write and its hash fault the input's pages in (BENCHMARKS.md). The kernel's own copy
(copy_file_range, where the filesystem clones) and a GGUF's lane still take the map.
"""

from __future__ import annotations

import functools
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lazymerge.errors import InputError
from lazymerge.plan.model import COMPUTE, PlannedTensor
from lazymerge.read.maps import MappedFiles
from lazymerge.read.readahead import ReadAhead
from lazymerge.run.budget import copy_buffers, copy_chunk
from lazymerge.write.safetensors import ShardWriter

Step = Callable[[int], object]  # progress: called with the bytes just written
# A copy written ahead is hashed later, by the writer's other thread, while the next
# bytes are written: in pieces this small, the pages of both stay few (64 MiB pieces
# held ~40 MiB more at the peak, 13B-shaped, 2 layers).
AHEAD_CHUNK = 8 * 2**20
After = Callable[[], object] | None


class Sink(Protocol):
    """Where copies go: a ShardWriter, or a GGUF's encoding lane (run/encode.py)."""

    def copy(
        self, offset: int, source: tuple[int, int], data: memoryview, after: After = None
    ) -> None: ...


def is_byte_copy(t: PlannedTensor) -> bool:
    """Whether a safetensors output's tensor is its input's bytes as they are (no
    arithmetic, no decoding, no encoding)."""
    return (
        t.action != COMPUTE
        and t.data is None
        and t.encoding is None
        and t.inputs[0].ref.contiguous
        and t.inputs[0].ref.blocks is None
    )


class CopyBuffers:
    """The buffers plain copies are read into: page-aligned, copy_chunk bytes each, at
    most copy_buffers of them; each goes to the writer and comes back (`give`) once
    written and hashed. `idle()` lets their pages go while no copy runs (a computed
    tensor holds its own buffers); a buffer given back after it loses its pages too."""

    def __init__(self, budget: int) -> None:
        self.size = copy_chunk(budget)
        self._most = copy_buffers(budget)
        self._made = 0
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._idle = False
        self._lock = threading.Lock()  # `idle` and a give from the writer's threads

    def take(self) -> mmap.mmap:
        """A free buffer, or a new one while fewer than the most are made; else wait for
        the writer to give one back. From one thread only (the copying one)."""
        self._idle = False
        if self._free.empty() and self._made < self._most:
            self._made += 1
            return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return self._free.get()

    def give(self, buf: mmap.mmap) -> None:
        """`buf` is written and hashed (or dropped): free for the next chunk."""
        with self._lock:
            if self._idle:
                _drop_pages(buf)
            self._free.put(buf)

    def idle(self) -> None:
        """No copy for a while: the free buffers' pages go now, the others' on return
        (so a second call, with no take between, has nothing to do)."""
        with self._lock:
            if self._idle:
                return
            self._idle = True
            free = []
            while not self._free.empty():
                free.append(self._free.get())
            for buf in free:
                _drop_pages(buf)
                self._free.put(buf)


def _drop_pages(buf: mmap.mmap) -> None:
    """The buffer's pages back to the OS (they read as zeros after); kept where the OS
    has no such advice."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None:
        buf.madvise(advice)


def read_into(fd: int, view: memoryview, position: int, file: Path) -> None:
    """Fill `view` from `fd` at `position`, or say in one line that the file ended or
    could not be read."""
    got = 0
    while got < len(view):
        try:
            n = _pread_into(fd, view[got:], position + got)
        except OSError as e:
            raise InputError(f"{file}: cannot read ({e.strerror})") from None
        if n <= 0:
            raise InputError(
                f"{file}: ends at byte {position + got}, before the tensor it holds; "
                "was it changed during the merge?"
            )
        got += n


def _pread_into(fd: int, view: memoryview, position: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], position)
    data = os.pread(fd, len(view), position)  # a platform without preadv: one copy more
    view[: len(data)] = data
    return len(data)


@dataclass(frozen=True)
class Copier:
    """Byte copies from the input files into one shard's writer: read into `buffers`
    where they are given and the writer is a safetensors shard's that does not copy in
    the kernel; from the maps otherwise."""

    files: MappedFiles
    writer: Sink
    budget: int  # bytes: a copy's chunks are at most this (and COPY_CHUNK)
    step: Step
    buffers: CopyBuffers | None = None

    def copy(self, t: PlannedTensor) -> None:
        """`t`'s bytes, chunk by chunk, in order."""
        w = self.writer
        if self.buffers is not None and isinstance(w, ShardWriter) and not w.kernel_copies:
            self._read(t, w, self.buffers)
        else:
            self._chunks(t, self.writer.copy, copy_chunk(self.budget))

    def copy_ahead(self, t: PlannedTensor) -> None:
        """`t`'s bytes before the bytes in front of them (ShardWriter.copy_ahead)."""
        assert isinstance(self.writer, ShardWriter)  # a GGUF writes in order, via its lane
        self._chunks(t, self.writer.copy_ahead, max(min(self.budget, AHEAD_CHUNK), 1))

    def _read(self, t: PlannedTensor, writer: ShardWriter, buffers: CopyBuffers) -> None:
        src = t.inputs[0].ref
        fd = self.files.fd(src.file)
        for start in range(0, src.nbytes, buffers.size):
            stop = min(start + buffers.size, src.nbytes)
            buf = buffers.take()
            try:
                view = memoryview(buf)[: stop - start]
                read_into(fd, view, src.offset + start, src.file)
                writer.write(t.offset + start, view, functools.partial(buffers.give, buf))
            except BaseException:
                buffers.give(buf)  # never queued: the writer raised, or the read did
                raise
            self.step(stop - start)

    def _chunks(self, t: PlannedTensor, put: Callable[..., None], chunk: int) -> None:
        src = t.inputs[0].ref
        for start in range(0, src.nbytes, chunk):
            stop = min(start + chunk, src.nbytes)
            # The kernel copies file to file, or the writer writes from the map; its hash
            # thread reads the mapped bytes, then drops their pages.
            release = functools.partial(self.files.release, src, start, stop)
            source = (self.files.fd(src.file), src.offset + start)
            put(t.offset + start, source, self.files.raw(src, start, stop), release)
            self.step(stop - start)


class CopyLane:
    """A shard's plain copies on a thread of their own (reserved in the writer first),
    written ahead while the merge's own thread imports torch and computes the rest, so
    that the disk copies while the cores compute. Its own read-ahead, the copier's budget
    ahead."""

    def __init__(self, copier: Copier, tensors: list[PlannedTensor]) -> None:
        assert isinstance(copier.writer, ShardWriter)
        self._writer = copier.writer
        for t in tensors:
            self._writer.reserve(t.offset, t.nbytes)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(copier, tensors), name="copies", daemon=True
        )
        self._thread.start()

    def _run(self, copier: Copier, tensors: list[PlannedTensor]) -> None:
        try:
            with ReadAhead([r for t in tensors for r in t.reads()], copier.budget) as reads:
                for t in tensors:
                    copier.copy_ahead(t)
                    for r in t.reads():
                        reads.used(r)
        except BaseException as e:  # the merge's thread raises it (join), or its own
            self._error = e
            self._writer.fail(e)  # nothing waits for bytes that will not come

    def join(self) -> None:
        """Wait for the copies to be queued; raise what stopped them."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self, error: BaseException) -> None:
        """The merge failed: the lane stops at its next write (the writer raises)."""
        self._writer.fail(error)
        self._thread.join()
