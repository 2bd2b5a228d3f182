"""The head start (issue 19, part 3): while torch is imported on a thread of its own
(run/load.py), a shard's first plain copies are written ahead of the tensors before them
(ShardWriter.copy_ahead: written as they come, hashed in file order). The shard's bytes
and sha256 are those of a merge written in order; misuse of the writer is refused."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lazymerge.plan import build_plan
from lazymerge.read.mapped import MappedReader
from lazymerge.read.maps import MappedFiles
from lazymerge.read.tensorref import TensorRef
from lazymerge.recipe import load_recipe
from lazymerge.run.copies import is_byte_copy
from lazymerge.run.shard import head_start
from lazymerge.testing import LlamaShape
from lazymerge.write.safetensors import ShardWriter

from conftest import synthetic_job

HEADER = b"\x10" + bytes(7) + b"{}" + b" " * 14
SHAPE = LlamaShape(layers=3, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(300_000)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    return path, data


def test_copies_written_ahead_hash_in_file_order(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """Pieces 3 and 1 copied ahead, then 0 and 2 written in order (the writer skips what
    is already there): the file and its sha256 are the in-order ones; `after` runs for a
    copy ahead once written and once hashed."""
    path, data = source
    cuts = [0, 1000, 70_001, 150_000, 300_000]
    pieces = list(itertools.pairwise(cuts))
    calls: dict[int, int] = {}
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data), inflight=4096)
    for k in (3, 1):
        a, b = pieces[k]
        after = lambda k=k: calls.__setitem__(k, calls.get(k, 0) + 1)  # noqa: E731
        writer.copy_ahead(a, (fd, a), memoryview(data)[a:b], after)
    for k in (0, 2):
        a, b = pieces[k]
        writer.write(a, data[a:b], lambda k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
    result = writer.finish()
    os.close(fd)
    written = (tmp_path / "s.safetensors").read_bytes()
    assert written == HEADER + data
    assert result.sha256 == hashlib.sha256(HEADER + data).hexdigest()
    assert calls == {0: 1, 1: 2, 2: 1, 3: 2}


def test_a_copy_ahead_at_the_next_position_is_an_ordinary_copy(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data))
    writer.copy_ahead(0, (fd, 0), memoryview(data))
    writer.finish()
    os.close(fd)
    assert (tmp_path / "s.safetensors").read_bytes() == HEADER + data


@pytest.mark.parametrize(
    ("ahead", "then", "why"),
    [
        ((100, 200), ("ahead", 150, 250), "already written"),  # overlaps a copy ahead
        ((100, 200), ("write", 0, 150), "expected 0"),  # in order, into a copy ahead
        ((100, 200), ("ahead", 0, 0), ""),  # nothing to refuse: an empty copy at the start
    ],
)
def test_overlapping_writes_are_refused(
    tmp_path: Path,
    source: tuple[Path, bytes],
    ahead: tuple[int, int],
    then: tuple[str, int, int],
    why: str,
) -> None:
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data))
    writer.copy_ahead(ahead[0], (fd, ahead[0]), memoryview(data)[ahead[0] : ahead[1]])
    kind, a, b = then
    try:
        if not why:
            writer.copy_ahead(a, (fd, a), memoryview(data)[a:b])
            writer.write(0, data[:100])
            writer.write(200, data[200:])
            writer.finish()
            assert (tmp_path / "s.safetensors").read_bytes() == HEADER + data
            return
        with pytest.raises(RuntimeError, match=why):
            if kind == "ahead":
                writer.copy_ahead(a, (fd, a), memoryview(data)[a:b])
            else:
                writer.write(a, data[a:b])
        writer.abort()
    finally:
        os.close(fd)
    assert (tmp_path / "s.safetensors.partial").exists()
    assert not (tmp_path / "s.safetensors").exists()


def test_a_copy_ahead_before_the_position_is_refused(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data))
    writer.write(0, data[:500])
    with pytest.raises(RuntimeError, match="already written"):
        writer.copy_ahead(100, (fd, 100), memoryview(data)[100:200])
    writer.abort()
    os.close(fd)


def test_an_abort_with_copies_ahead_unhashed_lets_them_go(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The bytes before a copy ahead never come (the merge failed): abort returns, the
    copy's `after` has run (its pages let go), the shard stays `.partial`."""
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data))
    calls: list[int] = []
    writer.copy_ahead(1000, (fd, 1000), memoryview(data)[1000:], lambda: calls.append(1))
    writer.abort()
    os.close(fd)
    assert 1 <= len(calls) <= 2  # once written; once more if the hash thread let it go last
    assert (tmp_path / "s.safetensors.partial").exists()


def test_finish_refuses_a_shard_with_a_gap_before_a_copy_ahead(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = ShardWriter(tmp_path / "s.safetensors", HEADER, len(data))
    writer.copy_ahead(1000, (fd, 1000), memoryview(data)[1000:])
    with pytest.raises(RuntimeError, match="plan says more"):
        writer.finish()
    writer.abort()
    os.close(fd)


def test_head_start_takes_the_first_plain_copies_up_to_its_bytes(tmp_path: Path) -> None:
    recipe = synthetic_job(
        tmp_path, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, output={"dtype": "float16"}
    )
    shard = build_plan(load_recipe(recipe)).shards[0]
    copies = [t for t in shard.tensors if is_byte_copy(t)]
    assert copies and len(copies) < len(shard.tensors)  # computed tensors between them
    assert head_start(shard, 10**12) == copies
    assert head_start(shard, 0) == []
    most = copies[0].nbytes + copies[1].nbytes
    assert head_start(shard, most) == copies[:2]
    assert head_start(shard, most - 1) == copies[:1]


CHILD = textwrap.dedent(
    """
    import sys
    import threading
    from lazymerge.cli import main
    from lazymerge.write import safetensors

    seen = []
    real = safetensors.ShardWriter.copy_ahead

    def spy(self, offset, *args, **kwargs):
        loading = any(t.name == "import torch" for t in threading.enumerate())
        seen.append((offset, not loading))
        return real(self, offset, *args, **kwargs)

    safetensors.ShardWriter.copy_ahead = spy
    rc = main(["merge", sys.argv[1], "-o", sys.argv[2], "-q"])
    print(rc, len(seen), sum(1 for _, loaded in seen if not loaded))
    """
)


def test_a_merge_copies_ahead_while_torch_loads_and_writes_the_same_bytes(
    tmp_path: Path,
) -> None:
    """In a fresh process (torch not imported yet) the merge copies ahead before torch is
    in; with LAZYMERGE_HEAD_START=0 it copies nothing ahead; both outputs' shards, and the
    sha256 their manifests record, are the same."""
    recipe = synthetic_job(
        tmp_path, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, output={"dtype": "float16"}
    )
    found = {}
    for head in ("1073741824", "0"):
        out = tmp_path / f"out-{head}"
        env = {**os.environ, "LAZYMERGE_HEAD_START": head}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(recipe), str(out)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        rc, ahead, before_torch = map(int, done.stdout.split())
        assert rc == 0
        manifest = json.loads((out / "lazymerge.json").read_text())
        found[head] = (
            {p.name: p.read_bytes() for p in out.glob("*.safetensors")},
            json.dumps(manifest.get("shards"), sort_keys=True),
            ahead,
            before_torch,
        )
    assert found["0"][2] == 0
    assert found["1073741824"][2] > 0 and found["1073741824"][3] > 0
    assert found["0"][:2] == found["1073741824"][:2]
    for name, data in found["0"][0].items():
        assert hashlib.sha256(data).hexdigest() in found["0"][1], name


def test_a_reader_on_shared_maps_has_its_pages_released_by_either(tmp_path: Path) -> None:
    """The maps the head start opened (MappedFiles) become the compute side's reader's
    (MappedReader): files a view touched through one are released through the other,
    however often (a set replaced, not emptied, once left the reader's touches unreleased:
    +60 MiB peak on an 8-layer merge)."""
    path = tmp_path / "t.bin"
    path.write_bytes(bytes(range(256)) * 64)
    ref = TensorRef("t", path, "U8", (64, 256), offset=0, nbytes=64 * 256)
    with MappedFiles() as files:
        reader = MappedReader(files)
        for _ in range(3):
            assert torch.equal(reader.rows(ref, 1, 2)[0], torch.arange(256, dtype=torch.uint8))
            assert reader._touched == files._touched == {path}
            files.release_touched()
            assert not reader._touched and not files._touched
            files.raw(ref, 0, 4)
            reader.release_touched()
            assert not reader._touched and not files._touched


def test_the_merge_side_imports_no_torch_until_it_loads_it() -> None:
    """What a merge runs before torch is in (run/merge.py, run/shard.py, the writer, the
    maps) imports none of it."""
    code = (
        "import sys, lazymerge.run.merge, lazymerge.run.shard, lazymerge.cli.commands; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
