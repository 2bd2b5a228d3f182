"""The streaming safetensors shard writer: bytes at offsets.

A shard's header is fixed before any data exists (from the plan's tensors); tensor bytes
are then written at their offsets as the executor produces them, hashed on the way, and
the shard is fsynced and renamed from `*.partial` only when complete. What the files of
the output directory mean together (manifest, index) is output.py's business.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PARTIAL = ".partial"
# copy_file_range's ways of saying "not between these two files": fall back to pwrite.
COPY_RANGE_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
# Filesystems where copy_file_range clones blocks or copies server-side, so copied
# tensors move no data through this machine. Elsewhere (ext4, tmpfs, overlay) the kernel
# copy measured slower than writing from the map (0.50-0.56 vs 0.76-0.95 GiB/s, cold,
# see BENCHMARKS.md), and plain writes are used. LAZYMERGE_COPY_RANGE=always|never overrides.
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


_sync_file_range = _libc_sync_file_range()
HASH, WRITE = 0, 1  # the writer's two threads ("lanes"), each taking every item


@dataclass(eq=False)
class Item:
    """A queued write: file position, bytes, callback once hashed and written, and for a
    copy the (fd, position) the same bytes are at in an input file."""

    at: int
    view: memoryview
    after: Callable[[], object] | None
    source: tuple[int, int] | None
    ahead: bool = False  # a copy queued before the bytes in front of it (copy_ahead)
    lanes: int = 2  # threads yet to be done with it


@dataclass(frozen=True)
class ShardResult:
    """A shard as written: file name, size in bytes, sha256 of the whole file."""

    name: str
    size: int
    sha256: str


class HeaderEntry(Protocol):
    """What a header says of a tensor (a PlannedTensor is one)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


def build_header(tensors: Sequence[HeaderEntry]) -> bytes:
    """8-byte length + JSON header, space-padded to a multiple of 8 like safetensors' own."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for t in tensors:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [t.offset, t.offset + t.nbytes],
        }
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


class ShardWriter:
    """Writes one shard: header first, then each tensor's bytes in plan order.

    Hashing and `pwrite` run on two threads of their own, each taking every queued item,
    so they overlap each other and the computation of the next block (plain copies are
    bound by them: an 8-layer 13B-shaped merge took 29.3 s with one thread doing both,
    21.2 s with two); the bytes queued at once are bounded by `inflight`. A queued
    buffer must stay untouched until written (the executor hands over fresh tensors and
    read-only maps); `after` callbacks run once their bytes are hashed and on their way
    to disk (or dropped after an error).

    Copies may also be written ahead of the bytes before them (`copy_ahead`): the write
    thread takes items as they come, the hash thread in file order, so a copy written
    early is hashed when its turn comes, read from its map again.
    """

    def __init__(
        self, final: Path, header: bytes, data_size: int, inflight: int = 64 * 2**20
    ) -> None:
        """`header` (safetensors' build_header, a GGUF's write/gguf.py header) goes first;
        `data_size` bytes of tensor data follow it, written in order."""
        self.final = final
        self.partial = final.with_name(final.name + PARTIAL)
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._sha = hashlib.sha256()
        self._data_start = len(header)
        self._end = self._data_start + data_size
        self._pos = 0
        self._flushed = 0  # writeback started up to here
        self._uncached = dontcache_wanted()  # RWF_DONTCACHE until the kernel refuses it
        self._sha.update(header)
        self._pwrite(header, 0)
        self._limit = max(inflight, 1)
        self._queued = 0
        self._cond = threading.Condition()
        self._writes: collections.deque[Item | None] = collections.deque()  # as queued
        self._hashes: dict[int, Item] = {}  # by file position, taken in file order
        self._hash_at = self._data_start  # the next position to hash
        self._ahead: dict[int, int] = {}  # data offset -> length, written ahead
        self._stopping = False
        self._copy_range = kernel_copy_pays(final.parent)
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, args=(lane,), name=f"{what} {final.name}", daemon=True)
            for lane, what in ((HASH, "hash"), (WRITE, "write"))
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def write(
        self, offset: int, data: memoryview | bytes, after: Callable[[], object] | None = None
    ) -> None:
        """Queue bytes for `offset` of the data section; offsets must arrive in order."""
        self._queue(offset, memoryview(data).cast("B"), after, None)

    def copy(
        self,
        offset: int,
        source: tuple[int, int],
        data: memoryview,
        after: Callable[[], object] | None = None,
    ) -> None:
        """Queue a copy of file bytes: `source` is (fd, position) of the same bytes as
        `data`, a read-only map of them. The kernel copies file to file where it can
        (copy_file_range: no pass through this process; on NFS or a reflink filesystem,
        no data moved at all); `data` is still read once, for the sha256."""
        self._queue(offset, memoryview(data).cast("B"), after, source)

    def copy_ahead(
        self,
        offset: int,
        source: tuple[int, int],
        data: memoryview,
        after: Callable[[], object] | None = None,
    ) -> None:
        """`copy`, for bytes further on than the next in order: written now, hashed when
        the bytes before them are, and skipped over by the writes in order. `after` runs
        once written and again once hashed (so it must bear being called twice: releasing
        map pages does), and the bytes count against `inflight` until written only."""
        if offset == self._pos:
            self.copy(offset, source, data, after)
            return
        view = memoryview(data).cast("B")
        if offset < self._pos or self._overlaps(offset, len(view)):
            raise RuntimeError(f"{self.partial}: copy ahead to {offset}, already written")
        self._put(Item(self._data_start + offset, view, after, source, ahead=True))
        self._ahead[offset] = len(view)

    def _queue(
        self,
        offset: int,
        view: memoryview,
        after: Callable[[], object] | None,
        source: tuple[int, int] | None,
    ) -> None:
        if offset != self._pos or self._overlaps(offset, len(view)):
            raise RuntimeError(f"{self.partial}: write at {offset}, expected {self._pos}")
        if view:
            self._put(Item(self._data_start + offset, view, after, source))
        elif after is not None:
            after()  # nothing to write
        self._pos += len(view)
        while self._pos in self._ahead:  # bytes already written ahead follow
            self._pos += self._ahead.pop(self._pos)

    def _overlaps(self, offset: int, size: int) -> bool:
        """Whether bytes [offset, offset + size) meet bytes written ahead."""
        return any(o < offset + size and offset < o + n for o, n in self._ahead.items())

    def _put(self, item: Item) -> None:
        with self._cond:
            # Wait for room, but never forever: one item larger than the limit goes alone.
            size = len(item.view)
            self._cond.wait_for(
                lambda: (
                    self._error is not None
                    or self._queued == 0
                    or self._queued + size <= self._limit
                )
            )
            if self._error is not None:
                raise self._error
            self._queued += size
            self._writes.append(item)
            self._hashes[item.at] = item
            self._cond.notify_all()

    def _next(self, lane: int) -> Item | None:
        """The next item for a lane: the write lane's in queue order (None: stop), the
        hash lane's the one at the next file position (None: stopped, none left there)."""
        with self._cond:
            if lane == WRITE:
                self._cond.wait_for(lambda: bool(self._writes))
                return self._writes.popleft()
            self._cond.wait_for(lambda: self._hash_at in self._hashes or self._stopping)
            item = self._hashes.pop(self._hash_at, None)
            if item is not None:
                self._hash_at += len(item.view)
            return item

    def _run(self, lane: int) -> None:
        while (item := self._next(lane)) is not None:
            try:
                if self._error is None:  # after one, items are only let go
                    self._handle(lane, item)
            except BaseException as e:  # handed to the executor's thread at its next call
                self._error = self._error or e
            self._done(item, lane)
        if lane == HASH:  # after an error: what could not be hashed in order is let go
            with self._cond:
                left, self._hashes = list(self._hashes.values()), {}
            for item in left:
                self._done(item, lane)

    def _handle(self, lane: int, item: Item) -> None:
        if lane == HASH:
            self._sha.update(item.view)
        elif item.source is not None:
            self._copy(item.source, item.view, item.at)
        else:
            self._pwrite(item.view, item.at)

    def _done(self, item: Item, lane: int) -> None:
        """One lane is done with `item`; the last one frees it. A copy written ahead is
        let go (its pages) once written too, as its hash may wait long."""
        with self._cond:
            item.lanes -= 1
            last = not item.lanes
        written_ahead = item.ahead and lane == WRITE
        if not (last or written_ahead):
            return
        try:
            if item.after is not None:
                item.after()  # written, or dropped after an error: its buffer is free either way
        except BaseException as e:
            self._error = self._error or e
        if written_ahead or (last and not item.ahead):
            with self._cond:
                self._queued -= len(item.view)
                self._cond.notify_all()

    def _pwrite(self, data: memoryview | bytes, at: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._write_at(view, at)
            view, at = view[n:], at + n
        self._start_writeback(at)

    def _write_at(self, view: memoryview, at: int) -> int:
        if self._uncached:
            try:
                return os.pwritev(self._fd, [view], at, RWF_DONTCACHE)
            except OSError as e:
                if e.errno not in DONTCACHE_UNSUPPORTED:
                    raise
                self._uncached = False  # this kernel or filesystem keeps pages: plain writes
        return os.pwrite(self._fd, view, at)

    def _start_writeback(self, end: int) -> None:
        """Have the kernel start writing what is written so far (it would otherwise wait
        for 10 % of RAM to be dirty, and leave the whole shard to the final fsync). Uncached
        writes start their own."""
        if self._uncached or _sync_file_range is None:
            return
        if end - self._flushed >= WRITEBACK:
            _sync_file_range(self._fd, self._flushed, end - self._flushed, SYNC_FILE_RANGE_WRITE)
            self._flushed = end

    def _copy(self, source: tuple[int, int], view: memoryview, at: int) -> None:
        fd, pos = source
        done = 0
        while self._copy_range and done < len(view):
            try:
                n = os.copy_file_range(fd, self._fd, len(view) - done, pos + done, at + done)
            except OSError as e:
                if e.errno not in COPY_RANGE_UNSUPPORTED:
                    raise
                n = 0
            if n == 0:  # not between these files: plain writes from here on
                self._copy_range = False
                break
            done += n
        if done < len(view):
            self._pwrite(view[done:], at + done)

    def _stop(self) -> None:
        with self._cond:
            self._writes.append(None)
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def finish(self) -> ShardResult:
        """Wait for the queue, fsync, close and give the shard its final name."""
        self._stop()
        if self._error is not None:
            raise self._error
        if self._data_start + self._pos != self._end:
            raise RuntimeError(f"{self.partial}: {self._pos} data bytes written, plan says more")
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.partial, self.final)
        return ShardResult(self.final.name, self._end, self._sha.hexdigest())

    def abort(self) -> None:
        """Close without renaming: the `.partial` file stays, visibly incomplete."""
        self._stop()
        os.close(self._fd)


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
