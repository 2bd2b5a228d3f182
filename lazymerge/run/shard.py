"""One output shard, written whole from the plan alone: its bytes do not depend on which
shards were written before it, or where (lazymerge.run.batch relies on that).

This module imports no torch, so that bytes can flow before torch is in (run/load.py
imports it on a thread of its own). With LAZYMERGE_COPY_LANE=1 a safetensors shard's
plain copies go on a lane of their own (run/copies.py CopyLane), reserved in the writer
and written ahead from the start, while torch loads and then while this thread computes
the other tensors in file order: the disk copies while the cores compute.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from lazymerge.plan.model import COMPUTE, PlannedTensor, Shard
from lazymerge.read.maps import MappedFiles
from lazymerge.read.readahead import ReadAhead
from lazymerge.run.budget import WRITE_QUEUE
from lazymerge.run.copies import Copier, CopyLane, Step, is_byte_copy
from lazymerge.run.load import TorchLoad
from lazymerge.run.options import MergeOptions
from lazymerge.write.safetensors import ShardResult, ShardWriter, build_header


@dataclass(frozen=True)
class ShardJob:
    """One shard being written: where its bytes go and where they come from."""

    shard: Shard
    writer: ShardWriter
    files: MappedFiles
    opts: MergeOptions
    step: Step


def write_shard(  # six: `loading` is run_merge's alone (batch workers have torch in)
    shard: Shard,
    out: Path,
    files: MappedFiles,
    opts: MergeOptions,
    step: Step,
    loading: TorchLoad | None = None,
) -> tuple[ShardResult, list[str]]:
    """Write `shard` into directory `out`, complete and renamed from `.partial`;
    `loading`: torch being imported meanwhile (None: it is in already).

    Returns its record and the tensors written with NaN/Inf (allow_nonfinite).
    """
    (out / shard.name).unlink(missing_ok=True)  # a stale or damaged earlier copy
    header = shard.header if shard.header is not None else build_header(shard.tensors)
    writer = ShardWriter(out / shard.name, header, shard.data_size, inflight=WRITE_QUEUE)
    job = ShardJob(shard, writer, files, opts, step)
    copies = lane_copies(shard) if copy_lane_wanted() else []
    taken = {id(t) for t in copies}
    rest = [t for t in shard.tensors if id(t) not in taken]
    lane = None
    try:
        if copies:
            lane = CopyLane(Copier(files, writer, opts.max_memory, step), copies)
        nonfinite = _rest(job, rest, loading) if rest else []
        if lane is not None:
            lane.join()
        return writer.finish(), nonfinite
    except BaseException as e:
        if lane is not None:
            lane.stop(e)
        writer.abort()
        raise


def copy_lane_wanted() -> bool:
    """Whether copies go on a lane of their own: with LAZYMERGE_COPY_LANE=1 only. On this
    project's 2-core machine the lane measured slower than the copies in file order (a
    2-layer 13B-shaped merge, cold: 6.4-6.7 s against 6.0 s; torch cached: 5.8 against
    5.0 s, BENCHMARKS.md): its threads, the hash's second read and torch's import share
    two cores and one disk. It is meant for machines with cores to spare: measure there
    (benchmarks/firstbyte.py --lane 0,1) before making it the default."""
    return os.environ.get("LAZYMERGE_COPY_LANE", "0") == "1"


def lane_copies(shard: Shard) -> list[PlannedTensor]:
    """The shard's tensors the copy lane writes: its plain byte copies (none for a GGUF,
    whose every write goes through its encoding lane, in order)."""
    if shard.header is not None:
        return []
    return [t for t in shard.tensors if is_byte_copy(t)]


def _rest(job: ShardJob, tensors: list[PlannedTensor], loading: TorchLoad | None) -> list[str]:
    """The tensors not on the copy lane, in file order, with their own read-ahead, once
    torch is in."""
    with ReadAhead([r for t in tensors for r in t.reads()], job.opts.max_memory) as ahead:
        if loading is not None:
            loading.wait()
        return _in_order(job, ahead, tensors)


def _done(job: ShardJob, ahead: ReadAhead, t: PlannedTensor) -> None:
    """`t` is written (or queued): its inputs' pages go, the read-ahead moves on."""
    job.files.release_touched()
    for r in t.reads():
        ahead.used(r)


def _in_order(job: ShardJob, ahead: ReadAhead, tensors: list[PlannedTensor]) -> list[str]:
    """The shard's other tensors, in file order, computed where they must be."""
    # Imported here: torch comes with these (run/load.py imported it on its own thread).
    from lazymerge.read.mapped import MappedReader
    from lazymerge.run.device import Scratch, resolve_device
    from lazymerge.run.encode import EncodeLane
    from lazymerge.run.tensor import ShardContext, write_tensor

    opts = job.opts
    scratch = Scratch(resolve_device(opts.device))
    sink = EncodeLane(job.writer) if job.shard.header is not None else job.writer
    ctx = ShardContext(
        MappedReader(job.files), sink, scratch, opts.max_memory, job.step,
        opts.allow_nonfinite, opts.lanes,
    )  # fmt: skip
    try:
        for t in tensors:
            # Each kind of tensor lets the other's buffers go: blocks before copies,
            # copy buffers' pages before a computed tensor.
            if t.action != COMPUTE:
                scratch.trim()
            else:
                ctx.copies.idle()
            write_tensor(ctx, t)
            if t.pad:  # a GGUF aligns the next tensor's data
                sink.write(t.offset + t.nbytes, bytes(t.pad))
            _done(job, ahead, t)
        ctx.close()
        if isinstance(sink, EncodeLane):
            sink.close()
    except BaseException:
        ctx.close()
        if isinstance(sink, EncodeLane):
            with contextlib.suppress(BaseException):
                sink.close()
        raise
    return ctx.nonfinite
