"""Plain copies into a safetensors shard are read into buffers of their own (run/copies.py
CopyBuffers) that the writer writes and hashes from: the bytes and the sha256 are the
input's, a buffer is never refilled before the writer gives it back, their pages go when
idle, and an input that ends early is one line."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lazymerge.errors import InputError
from lazymerge.plan.model import COPY_BASE, Input, PlannedTensor
from lazymerge.read.maps import MappedFiles
from lazymerge.read.tensorref import TensorRef
from lazymerge.run import budget
from lazymerge.run.copies import Copier, CopyBuffers, read_into
from lazymerge.write.safetensors import ShardWriter

HEADER = b"\x10" + bytes(7) + b"{}" + b" " * 14
PAGE = budget.PAGE


def _tensor(path: Path, offset: int, nbytes: int, at: int) -> PlannedTensor:
    ref = TensorRef("t", path, "U8", (nbytes,), offset=offset, nbytes=nbytes)
    return PlannedTensor("t", "U8", (nbytes,), nbytes, COPY_BASE, (Input("base", ref),), offset=at)


def _copy_all(
    tmp_path: Path, data: bytes, cuts: list[tuple[int, int]], buffers: CopyBuffers
) -> bytes:
    """The input's bytes between `cuts` (offset, length) copied one after the other
    into one shard; returns the shard's data section, checking its sha256."""
    src = tmp_path / "input.bin"
    src.write_bytes(data)
    total = sum(n for _, n in cuts)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, total, inflight=4 * PAGE)
    assert not writer.kernel_copies  # ext4/tmpfs here: the buffers' path
    steps: list[int] = []
    with MappedFiles() as files:
        copier = Copier(files, writer, 2 * PAGE, steps.append, buffers)
        at = 0
        for offset, n in cuts:
            copier.copy(_tensor(src, offset, n, at))
            at += n
        result = writer.finish()
    out = (tmp_path / "s.safetensors").read_bytes()
    assert result.sha256 == hashlib.sha256(out).hexdigest()
    assert sum(steps) == total
    return out[len(HEADER) :]


def test_copies_through_buffers_are_the_input_bytes(tmp_path: Path) -> None:
    """Tensors smaller than a buffer, spanning many, ending mid-buffer, at odd offsets."""
    data = os.urandom(20 * PAGE + 123)
    cuts = [(0, 10), (10, 3 * PAGE + 7), (5 * PAGE + 1, 11 * PAGE), (17 * PAGE, 3 * PAGE + 123)]
    buffers = CopyBuffers(2 * PAGE)
    got = _copy_all(tmp_path, data, cuts, buffers)
    assert got == b"".join(data[o : o + n] for o, n in cuts)
    assert buffers.size == 2 * PAGE


def test_a_buffer_is_refilled_only_once_written_and_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow writes: the copying thread runs out of buffers and waits for one to come back
    (two buffers at this budget); had it refilled one still queued, the file would hold
    later bytes in earlier places."""
    real_pwritev, real_pwrite = os.pwritev, os.pwrite
    writes: list[int] = []

    def slow_pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        time.sleep(0.01)
        writes.append(offset)
        return real_pwritev(fd, buffers, offset, flags)

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:  # where uncached is refused
        time.sleep(0.01)
        writes.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwritev", slow_pwritev)
    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    data = os.urandom(16 * PAGE)
    buffers = CopyBuffers(2 * PAGE)
    assert budget.copy_buffers(2 * PAGE) == 2
    assert _copy_all(tmp_path, data, [(0, len(data))], buffers) == data
    assert len(writes) >= 8  # written in buffer-sized pieces, every one of them


def test_idle_buffers_give_their_pages_back() -> None:
    """A buffer given back while idle, and one free when idle is called, read zeros after
    (their pages went back to the OS); a buffer in use is left alone."""
    buffers = CopyBuffers(4 * PAGE)
    first, second = buffers.take(), buffers.take()
    first[:5] = b"hello"
    second[:5] = b"world"
    buffers.give(first)
    buffers.idle()
    assert first[:5] == bytes(5)
    assert second[:5] == b"world"  # still the writer's
    buffers.give(second)  # comes back while idle
    assert second[:5] == bytes(5)
    again = buffers.take()  # reused, not a third one made
    assert again in (first, second)
    again[:5] = b"again"  # taken: idle again after it (not skipped as already idle)
    buffers.give(again)
    buffers.idle()
    assert again[:5] == bytes(5)


def test_an_input_that_ends_early_is_one_line(tmp_path: Path) -> None:
    """The file shrank after the plan read its header: an InputError naming it."""
    path = tmp_path / "input.bin"
    path.write_bytes(os.urandom(3 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(bytearray(2 * PAGE))
        read_into(fd, view, 0, path)  # within the file: fine
        with pytest.raises(InputError, match=r"input\.bin: ends at byte 12288, before the"):
            read_into(fd, view, 2 * PAGE, path)
    finally:
        os.close(fd)


def test_an_unreadable_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error (a failing disk) names the file and the reason; with no preadv on
    the platform, plain pread reads the same bytes."""
    path = tmp_path / "input.bin"
    data = os.urandom(2 * PAGE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:

        def failing(*args: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "preadv", failing)
        view = memoryview(bytearray(PAGE))
        with pytest.raises(InputError, match=r"input\.bin: cannot read \(Input/output error\)"):
            read_into(fd, view, 0, path)
        monkeypatch.delattr(os, "preadv")
        read_into(fd, view, PAGE, path)
        assert bytes(view) == data[PAGE:]
    finally:
        os.close(fd)


def test_a_failed_read_gives_its_buffer_back(tmp_path: Path) -> None:
    """A copy that fails reading loses no buffer: the next copy still finds one."""
    src = tmp_path / "input.bin"
    src.write_bytes(os.urandom(2 * PAGE))
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, 4 * PAGE, inflight=4 * PAGE)
    buffers = CopyBuffers(2 * PAGE)
    with MappedFiles() as files:
        copier = Copier(files, writer, 2 * PAGE, lambda n: None, buffers)
        for _ in range(3):  # more failures than buffers
            with pytest.raises(InputError):
                copier.copy(_tensor(src, PAGE, 4 * PAGE, 0))
        copier.copy(_tensor(src, 0, 2 * PAGE, 0))
    writer.abort()


def test_the_estimate_counts_the_buffers_a_copy_fills(tmp_path: Path) -> None:
    """A copy's working memory: the buffers in flight, never more than the tensor needs."""
    big = _tensor(tmp_path / "x", 0, 10**9, 0)
    small = _tensor(tmp_path / "x", 0, 100, 0)
    full = budget.DEFAULT_MAX_MEMORY
    assert budget.working_memory(big, full, 1) == budget.WRITE_QUEUE
    assert budget.working_memory(small, full, 1) == budget.COPY_CHUNK
    assert budget.working_memory(big, 4 * PAGE, 1) == 2 * 4 * PAGE  # two, at least
