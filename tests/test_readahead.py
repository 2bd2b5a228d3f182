"""The read-ahead thread: page-cache advice where the OS takes it, pread where it does not,
and never more than `ahead` bytes in front of the merge."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lazymerge.read import readahead
from lazymerge.read.readahead import ReadAhead
from lazymerge.read.tensorref import TensorRef

MiB = 2**20


def refs(tmp_path: Path, sizes: list[int]) -> list[TensorRef]:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(sum(sizes)))
    out, offset = [], 0
    for k, n in enumerate(sizes):
        out.append(TensorRef(f"t{k}", path, "U8", (n,), offset, n))
        offset += n
    return out


def settle(ahead: ReadAhead, want: int) -> int:
    """The thread's progress once it has reached `want` bytes or stopped moving."""
    deadline = time.monotonic() + 10
    while ahead._read < want and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # and had the chance to go further, if it (wrongly) would
    return ahead._read


@pytest.mark.parametrize("advice", [True, False])
def test_it_reads_everything_the_merge_goes_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, advice: bool
) -> None:
    calls = {"advise": 0, "pread": 0}
    real_advise, real_pread = os.posix_fadvise, os.preadv

    def advise(fd: int, offset: int, length: int, how: int) -> None:
        calls["advise"] += 1
        if not advice:
            raise OSError(22, "Invalid argument")  # what a filesystem without it says
        real_advise(fd, offset, length, how)

    def pread(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["pread"] += 1
        return real_pread(fd, buffers, offset)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "preadv", pread)
    tensors = refs(tmp_path, [3 * MiB, 20 * MiB, 1, 5 * MiB])
    total = sum(t.nbytes for t in tensors)
    with ReadAhead(tensors, 64 * MiB) as ahead:
        assert settle(ahead, total) == total
    chunks = sum(-(-t.nbytes // readahead.CHUNK) for t in tensors)
    if advice:
        assert calls == {"advise": chunks, "pread": 0}
    else:  # refused once, then read: the refused chunk too
        assert calls == {"advise": 1, "pread": chunks}


def test_it_stays_within_ahead_of_the_merge(tmp_path: Path) -> None:
    tensors = refs(tmp_path, [8 * MiB] * 6)
    with ReadAhead(tensors, 16 * MiB) as ahead:
        assert settle(ahead, 16 * MiB) == 16 * MiB  # two tensors, then it waits
        ahead.used(tensors[0])
        assert settle(ahead, 24 * MiB) == 24 * MiB  # one more for the one gone past
    # closed while waiting: the thread is gone, not stuck
    assert not ahead._thread.is_alive()
