"""The overlapped copy baseline (benchmarks/copies.py, issue 19): it reads exactly the
ranges it is given and writes files of exactly the sizes given, whatever their ratio, and
a read past a file's end is an error, not a short count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import copies
from benchmarks.copies import BUFFER, overlapped_copy


@pytest.mark.parametrize(
    ("ranges", "sizes"),
    [
        ([(0, 3 * BUFFER + 5), (4 * BUFFER, 1000)], [123, 0, BUFFER + 7, 45678]),  # reads more
        ([(10, 1000)], [2 * BUFFER + 3]),  # writes more than it reads
        ([], [10]),  # nothing to read
        ([(0, 100)], []),  # nothing to write
    ],
)
def test_overlapped_copy_reads_the_ranges_and_writes_the_sizes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ranges: list[tuple[int, int]],
    sizes: list[int],
) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(5 * BUFFER))
    reads = [[str(src), offset, length] for offset, length in ranges]
    opened, read = [], []
    real_open, real_preadv = os.open, os.preadv

    def spy_open(path: str, *args: int) -> int:
        opened.append(str(path))
        return real_open(path, *args)

    def spy_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        read.append((offset, n))
        return n

    monkeypatch.setattr(copies.os, "open", spy_open)
    monkeypatch.setattr(copies.os, "preadv", spy_preadv)
    seconds = overlapped_copy(reads, sizes, tmp_path / "out")
    assert seconds > 0
    assert opened.count(str(src)) == (1 if ranges else 0)  # once, however many ranges
    spans: list[tuple[int, int]] = []  # the reads, adjacent ones joined: the ranges given
    for offset, n in read:
        if spans and spans[-1][0] + spans[-1][1] == offset:
            spans[-1] = (spans[-1][0], spans[-1][1] + n)
        else:
            spans.append((offset, n))
    assert spans == ranges
    written = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()}
    assert written == {f"copy-{i}.bin": n for i, n in enumerate(sizes)}


def test_a_read_past_the_end_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(1000))
    with pytest.raises(RuntimeError, match="short read"):
        overlapped_copy([[str(src), 900, 200]], [10], tmp_path / "out")
