"""Shards written uncached (pwritev2 RWF_DONTCACHE: pages dropped once on disk) where the
kernel and filesystem take it, plain pwrite where they refuse: the same bytes and sha256
either way, and a refusal is a quiet fallback, not an error."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from lazymerge.testing import LlamaShape
from lazymerge.write.disk import RWF_DONTCACHE, dontcache_wanted
from lazymerge.write.safetensors import ShardWriter

from conftest import run_cli, synthetic_job

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pwritev2 flags are Linux's")
SHAPE = LlamaShape(layers=2, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
REAL_PWRITEV = os.pwritev
PIECES = [os.urandom(n) for n in (5000, 1, 70_000, 4096, 123_457)]


def write_shard(path: Path) -> str:
    """A shard of uneven pieces (offsets off every block boundary); its recorded sha256."""
    header = b"\x10" + bytes(7) + b"{}" + b" " * 14
    writer = ShardWriter(path, header, sum(map(len, PIECES)), inflight=8192)
    at = 0
    for piece in PIECES:
        writer.write(at, piece)
        at += len(piece)
    result = writer.finish()
    assert path.read_bytes() == header + b"".join(PIECES)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == result.sha256
    return result.sha256


def spy(calls: list[int], refuse: int | None = None) -> Any:
    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        calls.append(flags)
        if refuse is not None:
            raise OSError(refuse, os.strerror(refuse))
        return REAL_PWRITEV(fd, buffers, offset, flags)

    return pwritev


def test_uncached_and_plain_writes_give_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", spy(calls))
    uncached = write_shard(tmp_path / "a.safetensors")
    assert calls and set(calls) == {RWF_DONTCACHE}  # every write, or once where refused
    monkeypatch.setenv("LAZYMERGE_DONTCACHE", "0")
    calls.clear()
    assert write_shard(tmp_path / "b.safetensors") == uncached
    assert not calls and not dontcache_wanted()


@pytest.mark.parametrize("why", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_refusal_falls_back_to_plain_writes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: int
) -> None:
    """An older kernel or a filesystem without it (tmpfs) says EOPNOTSUPP: asked once."""
    expected = write_shard(tmp_path / "plain.safetensors")
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", spy(calls, refuse=why))
    assert write_shard(tmp_path / "refused.safetensors") == expected
    assert len(calls) == 1


def test_other_errors_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwritev", spy([], refuse=errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"):
        ShardWriter(tmp_path / "full.safetensors", b"x" * 8, 0)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_tmpfs_takes_the_fallback(tmp_path: Path) -> None:
    """The real thing: tmpfs keeps every page in memory and refuses RWF_DONTCACHE."""
    shm = Path("/dev/shm") / f"lazymerge-{os.getpid()}"
    shm.mkdir()
    try:
        assert write_shard(shm / "s.safetensors") == write_shard(tmp_path / "s.safetensors")
    finally:
        for p in shm.iterdir():
            p.unlink()
        shm.rmdir()


def test_a_merge_is_the_same_bytes_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole merge, shards and manifest's hashes, with uncached writes on and off."""
    recipe = synthetic_job(
        tmp_path / "job", SHAPE, {"values": [0.5, 0.0], "layers": [0, 1]},
        output={"shard_size": "1MB"},
    )  # fmt: skip
    shards = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LAZYMERGE_DONTCACHE", flag)
        out = tmp_path / f"out-{flag}"
        assert run_cli("merge", recipe, "-o", out, "-q") == 0
        manifest = json.loads((out / "lazymerge.json").read_text())
        for name, rec in manifest["shards"].items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rec["sha256"]
        shards[flag] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert len(shards["1"]) > 1 and shards["1"] == shards["0"]


def test_the_benchmark_writes_the_same_bytes_every_way(tmp_path: Path) -> None:
    """benchmarks/odirect.py: each way of writing the overlapped copy, the same files."""
    from benchmarks.odirect import MODES, copy

    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3_000_000))
    reads: list[list[Any]] = [[str(src), 0, 1_000_000], [str(src), 1_500_000, 1_500_000]]
    files = {}
    for mode in MODES:
        copy(reads, [700_000, 1, 1_234_567], tmp_path / mode, mode, 2**20)
        files[mode] = [p.read_bytes() for p in sorted((tmp_path / mode).iterdir())]
    assert [len(b) for b in files["buffered"]] == [700_000, 1, 1_234_567]
    assert all(f == files["buffered"] for f in files.values())
