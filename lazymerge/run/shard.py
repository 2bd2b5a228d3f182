"""One output shard, written whole from the plan alone: its bytes do not depend on which
shards were written before it, or where (lazymerge.run.batch relies on that)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lazymerge.plan.model import COMPUTE, Shard
from lazymerge.read.mapped import MappedReader
from lazymerge.read.readahead import ReadAhead
from lazymerge.run.budget import WRITE_QUEUE
from lazymerge.run.device import Scratch, resolve_device
from lazymerge.run.encode import EncodeLane
from lazymerge.run.options import MergeOptions
from lazymerge.run.tensor import ShardContext, Step, write_tensor

__all__ = ["write_shard", "write_tensor"]  # write_tensor: what tests and the timeline wrap
from lazymerge.write.safetensors import ShardResult, ShardWriter, build_header


def write_shard(
    shard: Shard, out: Path, reader: MappedReader, opts: MergeOptions, step: Step
) -> tuple[ShardResult, list[str]]:
    """Write `shard` into directory `out`, complete and renamed from `.partial`.

    Returns its record and the tensors written with NaN/Inf (allow_nonfinite).
    """
    (out / shard.name).unlink(missing_ok=True)  # a stale or damaged earlier copy
    header = shard.header if shard.header is not None else build_header(shard.tensors)
    writer = ShardWriter(out / shard.name, header, shard.data_size, inflight=WRITE_QUEUE)
    scratch = Scratch(resolve_device(opts.device))
    sink = EncodeLane(writer) if shard.header is not None else writer  # a GGUF encodes
    ctx = ShardContext(
        reader, sink, scratch, opts.max_memory, step, opts.allow_nonfinite, opts.lanes
    )
    reads = [(t, t.reads()) for t in shard.tensors]
    try:
        with ReadAhead([r for _, refs in reads for r in refs], opts.max_memory) as ahead:
            for t, refs in reads:
                if t.action != COMPUTE:
                    scratch.trim()
                write_tensor(ctx, t)
                if t.pad:  # a GGUF aligns the next tensor's data
                    sink.write(t.offset + t.nbytes, bytes(t.pad))
                reader.release_touched()
                for r in refs:
                    ahead.used(r)
        ctx.close()
        if isinstance(sink, EncodeLane):
            sink.close()
        return writer.finish(), ctx.nonfinite
    except BaseException:
        ctx.close()
        if isinstance(sink, EncodeLane):
            with contextlib.suppress(BaseException):
                sink.close()
        writer.abort()
        raise
