"""The copy lane (issue 19, parts 3 and 5): a shard's plain copies are reserved in the
writer and written ahead by a thread of their own (run/copies.py CopyLane), from the
start, while torch is imported (run/load.py) and then while the merge computes the
other tensors. The writer writes items as they come and hashes them in file order: the
shard's bytes and sha256 are those of a merge written in order; misuse is refused, and a
failure on either side stops the other."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lazymerge.plan import build_plan
from lazymerge.read.mapped import MappedReader
from lazymerge.read.maps import MappedFiles
from lazymerge.read.tensorref import TensorRef
from lazymerge.recipe import load_recipe
from lazymerge.run.copies import is_byte_copy
from lazymerge.run.shard import lane_copies
from lazymerge.testing import LlamaShape
from lazymerge.write import safetensors
from lazymerge.write.safetensors import ShardWriter

from conftest import error_of, synthetic_job

HEADER = b"\x10" + bytes(7) + b"{}" + b" " * 14
SHAPE = LlamaShape(layers=3, hidden=256, intermediate=768, heads=8, kv_heads=8, vocab=300)
CUTS = [0, 1000, 70_001, 150_000, 300_000]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(300_000)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    return path, data


def _writer(tmp_path: Path, size: int) -> ShardWriter:
    return ShardWriter(tmp_path / "s.safetensors", HEADER, size, inflight=4096)


def test_copies_ahead_from_another_thread_hash_in_file_order(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """Pieces 1 and 3 reserved and copied by another thread, 0 and 2 written in order
    (skipping the reserved ones): the file and its sha256 are the in-order ones."""
    path, data = source
    pieces = list(itertools.pairwise(CUTS))
    calls: dict[int, int] = {}

    def after(k: int) -> None:
        calls[k] = calls.get(k, 0) + 1

    fd = os.open(path, os.O_RDONLY)
    writer = _writer(tmp_path, len(data))
    for k in (1, 3):
        writer.reserve(pieces[k][0], pieces[k][1] - pieces[k][0])

    def lane() -> None:
        for k in (1, 3):
            a, b = pieces[k]
            for lo in range(a, b, 20_000):  # a reserved range filled in several pieces
                hi = min(lo + 20_000, b)
                writer.copy_ahead(lo, (fd, lo), memoryview(data)[lo:hi], lambda k=k: after(k))

    thread = threading.Thread(target=lane)
    thread.start()
    for k in (0, 2):
        a, b = pieces[k]
        writer.write(a, data[a:b], lambda k=k: after(k))
    thread.join(10)
    assert not thread.is_alive()
    result = writer.finish()
    os.close(fd)
    assert (tmp_path / "s.safetensors").read_bytes() == HEADER + data
    assert result.sha256 == hashlib.sha256(HEADER + data).hexdigest()
    assert calls[0] == 1 and calls[2] == 1
    # Each piece's pages let go after its last use: once written, again if hashed after.
    assert 4 <= calls[1] <= 2 * 4 and 8 <= calls[3] <= 2 * 8


def test_a_copy_ahead_never_waits_on_room_held_by_the_bytes_after_it(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The bytes after a reserved range are queued first and fill the writer's room (they
    wait for the range's hash): the copy into the range still goes (it has room of its
    own), where sharing the room deadlocked."""
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = _writer(tmp_path, len(data))  # inflight 4096: one item fills it
    writer.reserve(1000, 69_001)
    writer.write(0, data[:1000])
    writer.write(70_001, data[70_001:])  # waits in the hash for bytes 1000-70001
    lane = threading.Thread(
        target=writer.copy_ahead, args=(1000, (fd, 1000), memoryview(data)[1000:70_001])
    )
    lane.start()
    lane.join(10)
    assert not lane.is_alive()
    writer.finish()
    os.close(fd)
    assert (tmp_path / "s.safetensors").read_bytes() == HEADER + data


def test_a_failed_lane_lets_the_bytes_after_its_range_go(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The bytes after a reserved range are queued, then the lane fails before copying
    it: their hash will never come, so they are let go at once (their buffers back to
    the computing thread, which would otherwise wait for them forever)."""
    _, data = source
    writer = _writer(tmp_path, len(data))
    writer.reserve(1000, 69_001)
    back = threading.Event()
    writer.write(0, data[:1000])
    writer.write(70_001, data[70_001:], back.set)  # waits in the hash for bytes 1000-70001
    writer.fail(RuntimeError("the lane's read failed"))
    assert back.wait(10)
    with pytest.raises(RuntimeError, match="the lane's read failed"):
        writer.finish()
    writer.abort()


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ([("reserve", 100, 100), ("reserve", 150, 100)], "reserve at 150, already taken"),
        ([("write", 0, 500), ("reserve", 100, 100)], "reserve at 100, already taken"),
        ([("reserve", 100, 100), ("write", 0, 150)], "write at 0, expected 0"),
        ([("reserve", 100, 100), ("ahead", 120, 10)], "copy ahead to 120, not the next"),
        ([("ahead", 0, 10)], "copy ahead to 0, not the next reserved"),
        ([("reserve", 100, 100), ("ahead", 100, 101)], "copy ahead to 100, not the next"),
        ([("reserve", 299_000, 2000)], "reserve at 299000, already taken"),  # past the end
    ],
)
def test_writes_outside_their_place_are_refused(
    tmp_path: Path, source: tuple[Path, bytes], steps: list[tuple[str, int, int]], why: str
) -> None:
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = _writer(tmp_path, len(data))
    with pytest.raises(RuntimeError, match=why):
        for kind, a, n in steps:
            if kind == "reserve":
                writer.reserve(a, n)
            elif kind == "write":
                writer.write(a, data[a : a + n])
            else:
                writer.copy_ahead(a, (fd, a), memoryview(data)[a : a + n])
    writer.abort()
    os.close(fd)
    assert (tmp_path / "s.safetensors.partial").exists()
    assert not (tmp_path / "s.safetensors").exists()


def test_finish_refuses_a_shard_whose_reserved_bytes_never_came(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    _, data = source
    writer = _writer(tmp_path, len(data))
    writer.reserve(1000, 500)
    writer.write(0, data[:1000])
    writer.write(1500, data[1500:])
    with pytest.raises(RuntimeError, match="plan says more"):
        writer.finish()
    writer.abort()


def test_an_abort_with_copies_ahead_unhashed_lets_them_go(
    tmp_path: Path, source: tuple[Path, bytes]
) -> None:
    """The bytes before a copy ahead never come (the merge failed): abort returns, the
    copy's `after` has run (its pages let go), the shard stays `.partial`."""
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    writer = _writer(tmp_path, len(data))
    calls: list[int] = []
    writer.reserve(1000, len(data) - 1000)
    writer.copy_ahead(1000, (fd, 1000), memoryview(data)[1000:], lambda: calls.append(1))
    writer.abort()
    os.close(fd)
    assert 1 <= len(calls) <= 2  # once written; once more if the hash thread let it go last
    assert (tmp_path / "s.safetensors.partial").exists()


def test_copies_stay_within_the_window_in_front_of_the_hash(
    tmp_path: Path, source: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy more than AHEAD_WINDOW bytes in front of the hash waits for the bytes
    before it; a failure wakes it with the error."""
    monkeypatch.setattr(safetensors, "AHEAD_WINDOW", 10_000)
    path, data = source
    fd = os.open(path, os.O_RDONLY)
    for fails in (False, True):
        writer = _writer(tmp_path, len(data))
        writer.reserve(50_000, len(data) - 50_000)
        raised: list[BaseException] = []

        def lane(w: ShardWriter = writer, out: list[BaseException] = raised) -> None:
            try:
                w.copy_ahead(50_000, (fd, 50_000), memoryview(data)[50_000:])
            except RuntimeError as error:
                out.append(error)

        thread = threading.Thread(target=lane)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # 50 000 bytes in front of the hash: it waits
        if fails:
            writer.fail(RuntimeError("the merge failed"))
            thread.join(5)
            assert [str(e) for e in raised] == ["the merge failed"]
            writer.abort()
            continue
        writer.write(0, data[:50_000])
        thread.join(5)
        assert not thread.is_alive() and not raised
        writer.finish()
        assert (tmp_path / "s.safetensors").read_bytes() == HEADER + data
    os.close(fd)


def test_the_lane_takes_the_plain_copies(tmp_path: Path) -> None:
    recipe = synthetic_job(
        tmp_path, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, output={"dtype": "float16"}
    )
    shard = build_plan(load_recipe(recipe)).shards[0]
    copies = lane_copies(shard)
    assert copies == [t for t in shard.tensors if is_byte_copy(t)]
    assert copies and len(copies) < len(shard.tensors)  # computed tensors between them


def test_a_failed_copy_stops_the_merge_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error on the copy lane ends the merge (no hang: the computing thread is woken),
    in one line, the shard left `.partial`."""
    from lazymerge.errors import InputError
    from lazymerge.run.copies import Copier

    recipe = synthetic_job(
        tmp_path, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, output={"dtype": "float16"}
    )

    def broken(self: Copier, t: object) -> None:
        raise InputError("base/model.safetensors: cannot read (Input/output error)")

    monkeypatch.setattr(Copier, "copy_ahead", broken)
    monkeypatch.setenv("LAZYMERGE_COPY_LANE", "1")
    err = error_of(capsys, "merge", recipe, "-o", tmp_path / "out", "-q")
    assert err == "lazymerge: error: base/model.safetensors: cannot read (Input/output error)\n"
    assert list((tmp_path / "out").glob("*.safetensors.partial"))
    assert not list((tmp_path / "out").glob("*.safetensors"))


CHILD = textwrap.dedent(
    """
    import sys
    import threading
    from lazymerge.cli import main
    from lazymerge.write import safetensors

    seen = []
    real = safetensors.ShardWriter.copy_ahead

    def spy(self, offset, *args, **kwargs):
        names = {t.name for t in threading.enumerate()}
        seen.append((threading.current_thread().name, "import torch" in names))
        return real(self, offset, *args, **kwargs)

    safetensors.ShardWriter.copy_ahead = spy
    rc = main(["merge", sys.argv[1], "-o", sys.argv[2], "-q"])
    lanes = {name for name, _ in seen}
    print(rc, len(seen), sum(1 for _, loading in seen if loading), ",".join(sorted(lanes)) or "-")
    """
)


def test_a_merge_copies_on_its_lane_while_torch_loads_and_writes_the_same_bytes(
    tmp_path: Path,
) -> None:
    """In a fresh process (torch not imported yet) the copies go on the lane, some while
    torch is still being imported; with LAZYMERGE_COPY_LANE=0 nothing goes ahead; both
    outputs' shards, and the sha256 their manifests record, are the same."""
    recipe = synthetic_job(
        tmp_path, SHAPE, {"values": [0.9, 0.0], "layers": [0, 2]}, output={"dtype": "float16"}
    )
    found = {}
    for lane in ("1", "0"):
        out = tmp_path / f"out-{lane}"
        env = {**os.environ, "LAZYMERGE_COPY_LANE": lane}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(recipe), str(out)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        rc, ahead, while_loading, threads = done.stdout.split()
        assert rc == "0"
        manifest = json.loads((out / "lazymerge.json").read_text())
        found[lane] = (
            {p.name: p.read_bytes() for p in out.glob("*.safetensors")},
            json.dumps(manifest.get("shards"), sort_keys=True),
            int(ahead),
            int(while_loading),
            threads,
        )
    assert found["0"][2] == 0
    assert found["1"][2] > 0 and found["1"][3] > 0 and found["1"][4] == "copies"
    assert found["0"][:2] == found["1"][:2]
    for name, data in found["0"][0].items():
        assert hashlib.sha256(data).hexdigest() in found["0"][1], name


def test_a_reader_on_shared_maps_has_its_pages_released_by_either(tmp_path: Path) -> None:
    """The maps the copy lane opened (MappedFiles) become the compute side's reader's
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
