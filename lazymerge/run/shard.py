"""One output shard, written whole from the plan alone: its bytes do not depend on which
shards were written before it, or where (lazymerge.run.batch relies on that).

This module imports no torch: while torch is still being imported (run/load.py), a
safetensors shard's first plain copies (up to HEAD_START bytes) are written ahead of
the tensors before them, so that the disk works during the import; the rest follows in
file order once torch is in.
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
from lazymerge.run.copies import Copier, Step, is_byte_copy
from lazymerge.run.load import TorchLoad
from lazymerge.run.options import MergeOptions
from lazymerge.write.safetensors import ShardResult, ShardWriter, build_header

# Bytes a shard may copy ahead while torch is imported: more than the disk copies in the
# import's ~1.5-2 s, few enough that their pages are still cached when hashed in turn.
HEAD_START = 2**30


@dataclass(frozen=True)
class ShardJob:
    """One shard being written: where its bytes go and where they come from."""

    shard: Shard
    writer: ShardWriter
    files: MappedFiles
    opts: MergeOptions
    step: Step


def write_shard(
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
    early = loading is not None and loading.pending and shard.header is None
    first = head_start(shard, head_start_bytes()) if early else []
    order = first + [t for t in shard.tensors if t not in first]
    try:
        with ReadAhead([r for t in order for r in t.reads()], opts.max_memory) as ahead:
            copier = Copier(files, writer, opts.max_memory, step)
            for t in first:
                copier.copy_ahead(t)
                _done(job, ahead, t)
            if loading is not None:
                loading.wait()
            nonfinite = _in_order(job, ahead, order[len(first) :])
        return writer.finish(), nonfinite
    except BaseException:
        writer.abort()
        raise


def head_start_bytes() -> int:
    """HEAD_START, or LAZYMERGE_HEAD_START's bytes (0: none, as before torch loaded on
    its own thread; for measuring)."""
    return int(os.environ.get("LAZYMERGE_HEAD_START", HEAD_START))


def head_start(shard: Shard, most: int) -> list[PlannedTensor]:
    """The shard's plain copies to write while torch is imported: the first ones in file
    order, `most` bytes at most."""
    first: list[PlannedTensor] = []
    size = 0
    for t in shard.tensors:
        if not is_byte_copy(t):
            continue
        if size + t.nbytes > most:
            break
        first.append(t)
        size += t.nbytes
    return first


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
            if t.action != COMPUTE:
                scratch.trim()
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
